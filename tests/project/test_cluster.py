"""A one-machine rehearsal of the multi-machine setup, with the real servers on 127.0.0.1.

docs/deploy.md describes the deployment (deploy/compose.yaml, deploy/k8s/): PostgreSQL holds the
MLflow backend store and the Optuna storage (two databases), an S3-compatible object store holds
MLflow's artifacts and the DVC remote, ``mlflow server --serve-artifacts`` stands in front of
both, and N service replicas follow its registry. This module starts those pieces the way they
run there (PostgreSQL from Debian's package in its own data folder as an unprivileged user, with
password authentication over TCP; moto's S3 server; ``mlflow server`` with the deployment's
flags) and proves what the deployment relies on:

* tuning: two ``voltage tune`` workers started together on one PostgreSQL study share its budget
  (trials 0..n-1, each trained once, by both workers) and log into one MLflow parent run; a
  worker that draws a trial past the budget trains nothing and stops;
* registry and artifacts: the pipeline's ``train``, ``ion-model`` and ``register`` write the model
  to the object store through the tracking server (they hold no S3 credentials), and a second
  copy of the code with only ``MLFLOW_TRACKING_URI`` set serves it;
* replicas: two ``bentoml serve`` replicas follow one registry; a promotion through the server's
  REST API (as the UI does) reaches both within the reload interval while a client keeps sending
  requests to both, and none fails;
* DVC remote: ``dvc push`` to S3 and ``dvc pull`` into a fresh clone give the same bytes; a
  corrupted object is refused by ``dvc pull`` with ``verify = true`` (and, DVC's default, is not
  without it) and is found by the remote scrub (deploy/check_dvc_remote.py).

Run: ``bash scripts/rehearse_cluster.sh`` (or ``pytest -m cluster``). Nothing is downloaded here:
``bash scripts/setup.sh`` installs PostgreSQL (deploy/setup_cluster_tools.sh) and the pinned
Python packages; without them the module skips and says why. The servers are module-scoped: they
start once (~20 s) and stop when the module ends, not at the end of a whole-suite session.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.serving_fixtures import (
    REPO,
    VENV_BIN,
    MlflowStore,
    Server,
    cif,
    free_port,
    http_json,
    rocksalt,
    serve_env,
    start_bento,
    start_process,
    wait_until,
)


def _pg_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (Debian keeps them out of PATH, under
    /usr/lib/postgresql/<major>/bin); the newest major wins."""
    found = shutil.which("pg_ctl")
    folders = [Path(found).resolve().parent] if found else []
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in [*folders, *versions]:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


PG_BIN = _pg_bin()
IS_ROOT = os.geteuid() == 0


def _why_skip() -> str | None:
    if PG_BIN is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                "`bash deploy/setup_cluster_tools.sh` installs Debian's postgresql")  # fmt: skip
    if IS_ROOT:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    missing = [m for m in ("psycopg", "moto", "flask", "flask_cors", "boto3", "dvc_s3")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        return f"Python packages missing: {missing} (pinned in requirements.lock; scripts/setup.sh)"
    return None


pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip())),
]

PG_USER, PG_PASSWORD = "voltage", "rehearsal-only-password"  # the superuser
#: One login role per database, as deploy/postgres/init-databases.sh creates them.
DB_PASSWORDS = {"mlflow": "mlflow-rehearsal-pw", "optuna": "optuna-rehearsal-pw"}
S3_KEY, S3_SECRET = "rehearsal", "rehearsal-secret"
MLFLOW_BUCKET, DVC_BUCKET = "voltage-mlflow", "voltage-dvc"
#: deploy/compose.yaml names the tracking server ``mlflow``: the same Host allow-list is used here.
ALLOWED_HOSTS = "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
TINY_MODEL = {"atom_fea_len": 16, "h_fea_len": 16, "n_conv": 1}
SPACE = {
    "lr": {"low": 1e-4, "high": 0.03, "log": True},
    "weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
    "batch_size": [8, 16],
    "atom_fea_len": [16],
    "h_fea_len": [8, 16],
    "n_conv": [1],
}
BUDGET = 6
RELOAD_S = 1.0
#: A replica must serve a promoted version within the reload interval plus this long: it
#: downloads the version through the tracking server, loads and warms it before swapping.
LOAD_BOUND_S = 45.0

#: Wall-clock seconds of each part, written to $REHEARSAL_TIMINGS (scripts/rehearse_cluster.sh).
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _timings() -> Iterator[None]:
    yield
    out = os.environ.get("REHEARSAL_TIMINGS")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}, indent=2))


class _timed:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        TIMINGS[self.name] = time.monotonic() - self.t0


# ------------------------------------------------------------------------------ the servers
def _as_pg_user() -> dict[str, Any]:
    """initdb and postgres refuse to run as root: run them as Debian's ``postgres`` user."""
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if IS_ROOT else {}


@dataclass(frozen=True)
class Postgres:
    port: int
    folder: Path

    def url(self, database: str) -> str:
        """The URL a client of ``database`` uses: the database's own role."""
        return f"postgresql://{database}:{DB_PASSWORDS[database]}@127.0.0.1:{self.port}/{database}"

    def tables(self, database: str) -> set[str]:
        import psycopg

        with psycopg.connect(self.url(database)) as conn:
            rows = conn.execute(
                "select table_name from information_schema.tables where table_schema = 'public'"
            ).fetchall()
        return {r[0] for r in rows}


def _pg_ctl(*args: str, folder: Path, timeout: float = 90) -> None:
    assert PG_BIN is not None
    subprocess.run([str(PG_BIN / "pg_ctl"), *args], cwd=folder, check=True, capture_output=True,
                   timeout=timeout, **_as_pg_user())  # fmt: skip


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway cluster: its own data folder under /tmp (owned by the server's user), TCP on
    127.0.0.1 only with password (scram) authentication, and the deployment's databases made by
    its own script (deploy/postgres/init-databases.sh): ``mlflow`` (backend store) and
    ``optuna`` (study storage), each owned by its own role."""
    assert PG_BIN is not None
    folder = Path(tempfile.mkdtemp(prefix="voltage-pg-"))
    pwfile = folder / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if IS_ROOT:
        for path in (folder, pwfile):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    with _timed("postgres_start_s"):
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(folder / "data"), "-U", PG_USER,
             f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=folder, check=True, capture_output=True, timeout=120, **_as_pg_user(),
        )  # fmt: skip
        # fsync off: a rehearsal's data is thrown away; the socket lives in the private folder.
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        _pg_ctl("-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-t", "60",
                "-o", options, "start", folder=folder)  # fmt: skip
    pg = Postgres(port, folder)
    try:
        init = {"PATH": f"{PG_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PGHOST": "127.0.0.1",
                "PGPORT": str(port), "PGPASSWORD": PG_PASSWORD, "POSTGRES_USER": PG_USER,
                "MLFLOW_DB_PASSWORD": DB_PASSWORDS["mlflow"],
                "OPTUNA_DB_PASSWORD": DB_PASSWORDS["optuna"]}  # fmt: skip
        _run(["sh", str(REPO / "deploy/postgres/init-databases.sh")], init, folder)
        yield pg
    finally:
        try:
            _pg_ctl("-D", str(folder / "data"), "-m", "fast", "-w", "-t", "30", "stop",
                    folder=folder)  # fmt: skip
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What the object store's own users (mlflow server, DVC) hold; nobody else does."""
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)  # fmt: skip

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)  # fmt: skip
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    Server(proc, "", Path("/dev/null")).stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """moto's S3 server (one process, like an S3-compatible store) with the deployment's two
    buckets: MLflow's artifacts and the DVC remote."""
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    port = free_port()
    with _timed("s3_start_s"):
        proc = start_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                              "-p", str(port)], dict(os.environ), log)  # fmt: skip
        store = ObjectStore(f"http://127.0.0.1:{port}")
        try:
            wait_until(lambda: store.client().list_buckets() is not None, 60, 0.3, "moto S3")
        except TimeoutError:
            _stop(proc)
            raise
    try:
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        _stop(proc)


@dataclass(frozen=True)
class Cluster:
    pg: Postgres
    s3: ObjectStore
    tracking_uri: str
    workdir: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        """A pipeline or service process: the tracking server's URL and nothing of the object
        store (no credentials, no endpoint, no AWS config files), so all artifacts must go
        through the server."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "VOLTAGE_"))}  # fmt: skip
        env.update(
            MLFLOW_TRACKING_URI=self.tracking_uri,
            MLFLOW_DISABLE_TELEMETRY="true",
            AWS_CONFIG_FILE=str(self.workdir / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.workdir / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            OMP_NUM_THREADS="1",
            OMP_WAIT_POLICY="PASSIVE",
            DVC_NO_ANALYTICS="1",
            PYTHONPATH=str(REPO),
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def cluster(postgres: Postgres, s3: ObjectStore, tmp_path_factory) -> Iterator[Cluster]:
    """``mlflow server`` as deploy/compose.yaml runs it: PostgreSQL backend store, artifacts
    proxied (``--serve-artifacts``) to the S3 bucket, the same Host allow-list."""
    workdir = tmp_path_factory.mktemp("cluster")
    port = free_port()
    env = {**os.environ, **s3.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", postgres.url("mlflow"),
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
        "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        "--allowed-hosts", ALLOWED_HOSTS,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with _timed("mlflow_server_start_s"):
        proc = start_process(cmd, env, workdir / "mlflow-server.log")

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((workdir / "mlflow-server.log").read_text()[-3000:])
            return http_json(f"{url}/health", method="GET", timeout=3)[0] == 200

        try:
            wait_until(up, 240, 0.5, "mlflow server")
        except BaseException:
            _stop(proc)
            raise
    try:
        yield Cluster(postgres, s3, url, workdir)
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------ helpers
def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 600,
         check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"{cmd[:4]} exited {res.returncode}:\n{res.stderr[-4000:]}"
    return res


def _voltage(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args]


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_params(folder: Path, experiment: str) -> Path:
    """The repository's params.yaml, shrunk for a 2-core machine: Li only, a tiny CGCNN, short
    training; ``mlflow.tracking_uri`` stays null so MLFLOW_TRACKING_URI decides, as on a
    worker machine."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ions"] = {"Li": {"clean_k": None}}
    params["source_ion"] = "Li"
    params["model"].update(TINY_MODEL)
    params["train"].update({"epochs": 3, "batch_size": 8, "scheduler": "none"})
    params["ensemble"] = {"n_models": 1, "n_heads": 2, "gp": None, "epochs": 20, "lr": 0.003,
                          "weight_decay": 0.0001, "bootstrap": True, "patience": 10,
                          "seed": 0}  # fmt: skip
    params["tune"].update({"study_name": "cluster", "storage": None, "n_trials": BUDGET,
                           "epochs": 12, "pruner": "median", "n_startup_trials": 2,
                           "n_warmup_steps": 6, "space": SPACE})  # fmt: skip
    params["mlflow"].update({"tracking_uri": None, "experiment": experiment})
    params["mlflow"].pop("artifact_location", None)
    params["transfer"]["chgnet"]["enabled"] = False
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _promote_like_the_ui(tracking_uri: str, name: str, version: int) -> None:
    """Move alias ``champion`` the way the MLflow UI does: its REST call (``ajax-api``)."""
    body = json.dumps({"name": name, "alias": "champion", "version": str(version)}).encode()
    req = urllib.request.Request(
        f"{tracking_uri}/ajax-api/2.0/mlflow/registered-models/alias", data=body,
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


# ------------------------------------------------------------------------------ the server
def test_tracking_server_keeps_runs_in_postgres_and_artifacts_in_s3(cluster: Cluster) -> None:
    """The deployment's mlflow server: its schema is in the ``mlflow`` database, a new
    experiment's artifacts default to the proxied store, and the Host allow-list admits the
    compose service name and nothing else."""
    import mlflow

    assert {"experiments", "runs", "registered_models"} <= cluster.pg.tables("mlflow")
    client = mlflow.MlflowClient(cluster.tracking_uri)
    exp = client.get_experiment(client.create_experiment("cluster-smoke"))
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
    search = f"{cluster.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    for host, status in (("mlflow:5000", 200), ("attacker.example", 403)):
        req = urllib.request.Request(search, headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                got = resp.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == status, (host, got)


# ------------------------------------------------------------------------------ tuning
def test_two_tune_workers_share_one_postgres_study_and_one_parent_run(
    cluster: Cluster, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    import mlflow
    import optuna

    params = _write_params(tmp_path, "cluster-tune")
    storage = cluster.pg.url("optuna")
    env = cluster.client_env()
    cmds = [
        _voltage("tune", "--ion", "Li", "--records", str(tiny_data["clean"]),
                 "--splits", str(tiny_data["splits"]), "--graphs", str(tiny_data["graphs"]),
                 "--storage", storage, "--params", str(params),
                 "--out", str(tmp_path / f"{k}.json"))
        for k in ("a", "b")
    ]  # fmt: skip
    with _timed("tune_two_workers_s"):
        procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in cmds]  # fmt: skip
        outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]

    (name,) = optuna.get_all_study_names(storage)
    assert name.startswith("cluster-")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers
    trained = [t for t in trials if not t.user_attrs.get("surplus")]
    # The budget is trials 0..n-1, each finished; a surplus trial (drawn in the same instant
    # the budget filled) never trained: no parameters, no epoch reported.
    assert sorted(t.number for t in trained) == list(range(BUDGET))
    assert all(t.state.is_finished() and t.state.name != "FAIL" for t in trained), trials
    for t in trials:
        if t.user_attrs.get("surplus"):
            assert t.state.name == "FAIL" and not t.params and not t.intermediate_values
    workers = {t.user_attrs["worker"] for t in trained}
    assert len(workers) == 2, f"one worker ran every trial: {workers}"
    # Optuna's tables live in their own database, not in MLflow's; both tools keep an
    # ``alembic_version`` table of their own, one reason they cannot share a database.
    optuna_tables, mlflow_tables = cluster.pg.tables("optuna"), cluster.pg.tables("mlflow")
    assert "trials" in optuna_tables and "trials" not in mlflow_tables
    assert "alembic_version" in optuna_tables and "alembic_version" in mlflow_tables

    client = mlflow.MlflowClient(cluster.tracking_uri)
    exp = client.get_experiment_by_name("cluster-tune")
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
    runs = client.search_runs([exp.experiment_id], max_results=500)
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "tune"]
    children = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    # One nested run per budget trial: none ran twice, none is missing.
    assert sorted(c.info.run_name for c in children) == sorted(f"trial-{i}" for i in range(BUDGET))
    best = min((json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab"),
               key=lambda b: b["value"])  # fmt: skip
    study = optuna.load_study(study_name=name, storage=storage)
    assert best["value"] == pytest.approx(study.best_value)
    assert "best.train.lr" in parent.data.tags and "best_val_mae" in parent.data.metrics
    per_worker = [sum(t.user_attrs["worker"] == w for t in trained) for w in sorted(workers)]
    TIMINGS["tune_trials_fewest_by_one_worker"] = float(min(per_worker))
    TIMINGS["tune_trial_median_s"] = sorted(
        (t.datetime_complete - t.datetime_start).total_seconds() for t in trained
    )[len(trained) // 2]
    TIMINGS["tune_surplus_records"] = float(len(trials) - len(trained))


def test_a_worker_drawing_past_the_budget_stops_untrained(
    cluster: Cluster, tiny_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact-budget rule's other side, made deterministic: a late worker joins a study whose
    last budget slot a peer is still running. The storage gives it trial number n (past the
    budget): it records that trial as failed with ``surplus``, trains nothing and stops."""
    import mlflow
    import optuna

    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.train.settings import TrainSettings
    from training.tune import TuneSettings, open_study, run_tune

    settings = TuneSettings.model_validate({
        "study_name": "cluster-late-worker", "storage": cluster.pg.url("optuna"), "n_trials": 3,
        "epochs": 2, "pruner": "none", "space": SPACE,
    })  # fmt: skip
    study = open_study(settings, settings.storage or "")
    for value in (0.9, 0.8):
        study.tell(study.ask(), value)
    peer = study.ask()  # trial 2, the budget's last, still running elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.tracking_uri)
    mlflow.set_tracking_uri(cluster.tracking_uri)
    mlflow.set_experiment("cluster-late-worker")
    base = TrainSettings.from_sections(
        TINY_MODEL, {"epochs": 2, "batch_size": 8, "scheduler": "none"}, {}
    )
    try:
        best = run_tune(load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li"),
                        GraphStore.load(tiny_data["graphs"]), base, settings, None)  # fmt: skip
    finally:
        mlflow.set_tracking_uri(None)
    trials = optuna.load_study(study_name=settings.study_name,
                               storage=settings.storage).get_trials(deepcopy=False)  # fmt: skip
    assert [t.number for t in trials] == [0, 1, 2, 3]
    late = trials[3]
    assert late.state.name == "FAIL" and late.user_attrs.get("surplus") is True
    assert not late.params and not late.intermediate_values
    assert trials[2].state.name == "RUNNING"  # the peer's trial is left alone
    assert best["value"] == 0.8 and best["n_trials"] == 3  # the surplus record is not counted
    study.tell(peer, 0.7)


# ------------------------------------------------------------------------------ registry
def _copy_for_serving(dest: Path) -> Path:
    """What a second machine's checkout holds of the code (files git tracks or would track, not
    ignored ones): the service, the model package and the params; no data, models or work/."""
    parts = ("serving", "voltage_model", "training", "params.yaml")
    cmd = ["git", "ls-files", "-co", "--exclude-standard", "--", *parts]
    listed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in listed.splitlines():
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_pipeline_writes_models_to_the_object_store_and_another_checkout_serves_them(
    cluster: Cluster, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    import mlflow

    proj = tmp_path / "pipeline"
    params = _write_params(proj, "cluster-pipeline")
    env = cluster.client_env()
    data = ["--records", str(tiny_data["clean"]), "--splits", str(tiny_data["splits"]),
            "--graphs", str(tiny_data["graphs"])]  # fmt: skip
    test_ids = json.loads(tiny_data["splits"].read_text())["ions"]["Li"]["test"]
    baselines = proj / "baselines_Li.csv"
    baselines.write_text("battery_id,target,mean\n" + "".join(f"{b},0,3.0\n" for b in test_ids))
    with _timed("pipeline_train_s"):
        _run(_voltage("train", "--ion", "Li", *data, "--epochs", "3", "--params", str(params),
                      "--checkpoint", "models/Li/model.pt", "--metrics", "reports/cgcnn_Li.json",
                      "--plot", "reports/parity_Li.png"), env, proj)  # fmt: skip
    with _timed("pipeline_ion_model_s"):
        _run(_voltage("ion-model", "--ion", "Li", *data, "--params", str(params),
                      "--source-checkpoint", "models/Li/model.pt", "--baselines", str(baselines),
                      "--checkpoint", "models/ions/Li.pt",
                      "--metrics", "reports/metrics/ion_Li.json",
                      "--predictions", "reports/predictions/ion_Li.csv"), env, proj)  # fmt: skip
    with _timed("pipeline_register_s"):
        _run(_voltage("register", "--metrics-dir", "reports/metrics", "--models-dir", "models/ions",
                      "--splits", str(tiny_data["splits"]), "--receipt", "reports/registry.json",
                      "--params", str(params)), env, proj)  # fmt: skip
    li = json.loads((proj / "reports/registry.json").read_text())["Li"]
    assert li["registered_now"] and li["champion"] == li["version"]
    assert not (proj / "work").exists() and not (proj / "mlruns").exists()  # nothing local

    # The registered checkpoint is in the bucket, byte for byte, under the version's location.
    client = mlflow.MlflowClient(cluster.tracking_uri)
    where = client.get_model_version_download_uri(li["name"], str(li["version"]))
    assert where.startswith("mlflow-artifacts:/"), where
    prefix = "artifacts/" + where.removeprefix("mlflow-artifacts:/").strip("/")
    keys = cluster.s3.keys(MLFLOW_BUCKET, prefix)
    assert any(k.endswith("/MLmodel") for k in keys), keys
    want = _sha256(proj / "models/ions/Li.pt")
    s3c = cluster.s3.client()
    stored = {k: hashlib.sha256(s3c.get_object(Bucket=MLFLOW_BUCKET, Key=k)["Body"].read())
              .hexdigest() for k in keys if k.endswith(".pt")}  # fmt: skip
    assert want in stored.values(), stored
    shutil.rmtree(proj / "models")  # from here on the model exists only in the registry

    # A second checkout: the code only, MLFLOW_TRACKING_URI the only setting it is given.
    second = _copy_for_serving(tmp_path / "second-checkout")
    assert not (second / "models").exists() and not (second / "release").exists()
    serve = cluster.client_env()
    serve.update(BENTOML_HOME=str(tmp_path / "bentoml_home"), BENTOML_DO_NOT_TRACK="True",
                 PYTHONPATH=str(second))  # fmt: skip
    with _timed("second_checkout_serve_start_s"):
        server = start_bento(tmp_path, serve, cwd=second, ready_timeout=240)
    try:
        payload = {"ion": "Li", "structure": cif(rocksalt(metal="Co"))}
        status, body = wait_until(
            lambda: (lambda a: a if a[0] == 200 else None)(
                http_json(f"{server.url}/predict", payload)),
            60, 0.5, "Li served by the second checkout",
        )  # fmt: skip
        assert status == 200, body
        assert body["model"]["source"] == "registry", body["model"]
        assert body["model"]["name"] == li["name"] and body["model"]["version"] == li["version"]
    finally:
        server.stop()


# ------------------------------------------------------------------------------ replicas
@dataclass(frozen=True)
class ServerStore(MlflowStore):
    """tests/serving_fixtures' model builder, publishing through the tracking server: the
    experiment takes the server's default artifact location (the object store)."""

    url: str = ""

    @property
    def tracking_uri(self) -> str:
        return self.url

    def _experiment_id(self) -> str:
        import mlflow

        exp = mlflow.get_experiment_by_name("cluster-replicas")
        return exp.experiment_id if exp else mlflow.create_experiment("cluster-replicas")


class _RoundRobin(threading.Thread):
    """A client sending Mg predictions to each replica in turn, as a load balancer would,
    recording (replica, time, version) per answer and every failure."""

    def __init__(self, servers: list[Server], pause_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.servers, self.pause_s = servers, pause_s
        self.answers: list[tuple[int, float, int]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        text, i = cif(rocksalt()), 0
        while not self.stop.is_set() and i < 20_000:
            k = i % len(self.servers)
            try:
                status, body = http_json(f"{self.servers[k].url}/predict",
                                         {"ion": "Mg", "structure": text}, timeout=30)  # fmt: skip
                if status == 200:
                    self.answers.append((k, time.monotonic(), int(body["model"]["version"])))
                else:
                    self.failures.append(f"replica {k}: HTTP {status}: {body}")
            except Exception as exc:
                self.failures.append(f"replica {k}: {exc!r}")
            i += 1
            time.sleep(self.pause_s)

    def count(self, replica: int, version: int, after: float = 0.0) -> int:
        return sum(1 for k, t, v in self.answers if k == replica and v == version and t >= after)


def test_replicas_follow_one_registry_through_a_promotion_without_failing(
    cluster: Cluster, tmp_path: Path
) -> None:
    import mlflow

    store = ServerStore(root=tmp_path / "models", url=cluster.tracking_uri)
    store.root.mkdir(parents=True)
    try:
        with store.active():
            v1 = store.publish("Mg", seed=1)
        envs = [serve_env(tmp_path / f"home{k}", None, **{
            k2: v2 for k2, v2 in cluster.client_env().items() if k2.startswith("MLFLOW_")},
            VOLTAGE_IONS="Mg", VOLTAGE_RELOAD_INTERVAL=str(RELOAD_S), VOLTAGE_WORKERS="1",
            VOLTAGE_MODEL_SOURCE="registry",  # as deploy/compose.yaml and deploy/k8s run them
        ) for k in range(2)]  # fmt: skip
        for env in envs:  # the replicas hold no object-store credentials either
            for key in [k for k in env if k.startswith("AWS_")]:
                del env[key]
            env["AWS_EC2_METADATA_DISABLED"] = "true"
        with _timed("replicas_start_s"), ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(start_bento, tmp_path / f"r{k}", envs[k], ready_timeout=240,
                                   wait_ready=True) for k in range(2)]  # fmt: skip
            replicas = [f.result() for f in futures]
        try:
            for r in replicas:  # what Kubernetes' probes ask (deploy/k8s/voltage.yaml)
                assert http_json(f"{r.url}/healthz", method="GET")[0] == 200
                assert http_json(f"{r.url}/readyz", method="GET")[0] == 200
            load = _RoundRobin(replicas)
            load.start()
            try:
                wait_until(lambda: all(load.count(k, v1.version) >= 5 for k in (0, 1)), 60,
                           what="answers from both replicas")  # fmt: skip
                with store.active():
                    v2 = store.publish("Mg", seed=2, alias="candidate")
                promoted = time.monotonic()
                _promote_like_the_ui(cluster.tracking_uri, v2.name, v2.version)
                wait_until(lambda: all(load.count(k, v2.version) >= 1 for k in (0, 1)),
                           RELOAD_S + LOAD_BOUND_S, what="both replicas serving v2")  # fmt: skip
                both = time.monotonic()
                wait_until(lambda: all(load.count(k, v2.version, both) >= 10 for k in (0, 1)),
                           60, what="answers after the swap")  # fmt: skip
            finally:
                load.stop.set()
                load.join(30)
            assert load.failures == [], load.failures[:5]
            for k in (0, 1):
                versions = [v for r, _, v in load.answers if r == k]
                first_new = versions.index(v2.version)
                assert set(versions[:first_new]) == {v1.version}
                assert set(versions[first_new:]) == {v2.version}, f"replica {k} flipped back"
                picked = min(t for r, t, v in load.answers if r == k and v == v2.version)
                TIMINGS[f"replica{k}_promotion_pickup_s"] = picked - promoted
            TIMINGS["replica_requests"] = float(len(load.answers))
        finally:
            for r in replicas:
                r.stop()
    finally:
        mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------ DVC remote
def test_dvc_remote_on_s3_round_trips_and_refuses_a_corrupted_object(
    cluster: Cluster, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    env = cluster.client_env(**{k: v for k, v in cluster.s3.env.items() if k.startswith("AWS_")})
    proj = tmp_path / "project"
    outputs = {"data/clean/records.jsonl.gz": tiny_data["clean"], "data/splits.json":
               tiny_data["splits"], "data/graphs/graphs.pt": tiny_data["graphs"]}  # fmt: skip
    for rel, src in outputs.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, proj / rel)
    (proj / "data/graphs/graphs.json").write_text('{"note": "a second file in a folder output"}\n')
    outputs["data/graphs/graphs.json"] = proj / "data/graphs/graphs.json"
    digests = {rel: _sha256(proj / rel) for rel in outputs}
    git = ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@localhost"]
    remote = f"s3://{DVC_BUCKET}/electrode-voltage"
    with _timed("dvc_push_s"):
        _run(["git", "init", "-q"], env, proj)
        _run(_dvc("init", "-q"), env, proj)
        _run(_dvc("add", "-q", "data/clean/records.jsonl.gz", "data/splits.json", "data/graphs"),
             env, proj)  # fmt: skip
        # What docs/deploy.md commits: the remote and its endpoint; credentials stay in the
        # environment (or .dvc/config.local), never in the repository.
        _run(_dvc("remote", "add", "-d", "storage", remote), env, proj)
        _run(_dvc("remote", "modify", "storage", "endpointurl", cluster.s3.endpoint), env, proj)
        _run(_dvc("remote", "modify", "storage", "verify", "true"), env, proj)
        _run([*git, "add", "-A"], env, proj)
        _run([*git, "commit", "-q", "-m", "data"], env, proj)
        _run(_dvc("push"), env, proj)
    assert S3_SECRET not in (proj / ".dvc/config").read_text()
    assert len(cluster.s3.keys(DVC_BUCKET, "electrode-voltage/files/md5/")) == 5  # 4 files + .dir

    with _timed("dvc_pull_fresh_clone_s"):
        _run(["git", "clone", "-q", str(proj), str(tmp_path / "clone")], env, tmp_path)
        _run(_dvc("pull"), env, tmp_path / "clone")
    assert {rel: _sha256(tmp_path / "clone" / rel) for rel in outputs} == digests
    scrub = [sys.executable, str(REPO / "deploy/check_dvc_remote.py")]
    ok = _run(scrub, env, tmp_path / "clone")
    assert "5 objects checked, 0 corrupted" in ok.stdout

    # Corrupt one object in the bucket (what a bad disk, a bad copy or a tamperer leaves).
    md5 = yaml.safe_load((proj / "data/splits.json.dvc").read_text())["outs"][0]["md5"]
    key = f"electrode-voltage/files/md5/{md5[:2]}/{md5[2:]}"
    cluster.s3.client().put_object(Bucket=DVC_BUCKET, Key=key, Body=b'{"ions": {}}\n')

    found = _run(scrub, env, tmp_path / "clone", check=False)
    assert found.returncode == 1 and key in found.stdout, found.stdout

    # verify = true (committed): the pull fails, names the output, and checks out no bad bytes.
    _run(["git", "clone", "-q", str(proj), str(tmp_path / "clone2")], env, tmp_path)
    refused = _run(_dvc("pull", "-v"), env, tmp_path / "clone2", check=False)
    assert refused.returncode != 0
    log = refused.stdout + refused.stderr
    assert "data/splits.json" in log and "corrupted cache file" in log, log[-3000:]
    assert not (tmp_path / "clone2/data/splits.json").exists()
    for rel in ("data/clean/records.jsonl.gz", "data/graphs/graphs.pt"):
        assert _sha256(tmp_path / "clone2" / rel) == digests[rel]

    # DVC's default (verify = false) trusts the remote: the corrupted bytes are checked out and
    # the pull succeeds. This is why docs/deploy.md sets verify = true.
    _run(["git", "clone", "-q", str(proj), str(tmp_path / "clone3")], env, tmp_path)
    _run(_dvc("remote", "modify", "--local", "storage", "verify", "false"), env,
         tmp_path / "clone3")  # fmt: skip
    _run(_dvc("pull"), env, tmp_path / "clone3")
    assert _sha256(tmp_path / "clone3/data/splits.json") != digests["data/splits.json"]
    assert "up to date" in _run(_dvc("status"), env, tmp_path / "clone3").stdout
