"""Tiny real models in a real MLflow registry, for service, CLI and bench tests.

Why a builder instead of a trained model: the service must be tested against the real artefact
path (self-describing checkpoint -> MLflow pyfunc -> registered version -> ``champion`` alias)
without training anything. A randomly initialised CGCNN with 8-wide layers and two ensemble heads
is written with ``save_checkpoint`` exactly as the pipeline writes one, logged with
``log_pyfunc`` and registered with ``training.registry``; each seed gives a different model, so a
test can tell versions apart by their predictions.

Usage (any test, or a bench)::

    store = MlflowStore.create(tmp_path / "mlflow")
    with store.active():
        v1 = store.publish("Li", seed=1)            # registered, alias champion
        v2 = store.publish("Li", seed=2, alias="candidate")

A module's server (tests that start a real ``bentoml serve``)::

    store = MlflowStore.published(workdir / "mlflow", {"Li": 1, "Mg": 2}, candidates={"Na": 3})
    with served(workdir, store, VOLTAGE_IONS="Li,Mg,Na", VOLTAGE_WORKERS="1") as server:
        yield server                                # stopped when the fixture is torn down

The store is a sqlite file plus an artifact folder under ``root``; ``store.env`` is what a
subprocess (``bentoml serve``, ``mlflow models serve``) needs to see the same registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from training.registry import register
from voltage_model.artifact import save_checkpoint
from voltage_model.graphs.converter import GraphConverter
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig, Head
from voltage_model.naming import CHAMPION, VersionInfo, model_name
from voltage_model.normalizer import Normalizer

PREFIX = "electrode-voltage"
EXPERIMENT = "serving-tests"
TINY = CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1, n_h=1)
#: Elements present in the tiny models' "training data": anything else is reported as unseen.
TRAIN_ELEMENTS = ("Li", "Na", "Mg", "Mn", "Co", "Ni", "Fe", "O", "S", "F")


def rocksalt(a: float = 4.4, metal: str = "Mn", anion: str = "O") -> Structure:
    """An 8-site conventional rocksalt cell (small, physical, fast to convert)."""
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), [metal, anion], [[0] * 3, [0.5] * 3]
    )


def perovskite(a: float = 3.9, a_site: str = "Li", b_site: str = "Ni", x: str = "O") -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(a), [a_site, b_site, x, x, x], coords)


def sample_structures(n: int = 8, seed: int = 0) -> list[Structure]:
    """Varied small crystals drawn from the tiny models' training elements."""
    rng = np.random.default_rng(seed)
    metals = ["Mn", "Co", "Ni", "Fe"]
    out = []
    for i in range(n):
        m = metals[i % len(metals)]
        if i % 2:
            out.append(rocksalt(4.2 + 0.4 * rng.random(), m, "O" if i % 3 else "S"))
        else:
            out.append(perovskite(3.8 + 0.3 * rng.random(), "Li", m, "O"))
    return out


def cif(structure: Structure) -> str:
    return str(CifWriter(structure))


def build_checkpoint(
    path: Path,
    ion: str,
    seed: int = 0,
    *,
    config: CGCNNConfig = TINY,
    n_heads: int = 2,
    test_mae: float = 0.5,
    train_elements: Sequence[str] = TRAIN_ELEMENTS,
    mean: float = 3.0,
    chgnet_weight: float | None = None,
) -> Path:
    """A randomly initialised CGCNN checkpoint with ``n_heads`` ensemble heads (seeded);
    ``chgnet_weight``: also a CHGNet GP head (fitted on the real CHGNet features of a few
    sample structures against random voltages) with that share of the served prediction."""
    torch.manual_seed(seed)
    model = CGCNN(config).eval()
    heads = []
    for k in range(n_heads):
        head = Head.from_model(model)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.05 * (k + 1) * torch.randn_like(p))
        heads.append(head)
    extra = {
        "ion": ion,
        "train_elements": sorted(train_elements),
        "test_mae": float(test_mae),
        "std_scale": 1.0,
        "seed": seed,
    }
    chgnet = None if chgnet_weight is None else chgnet_part(seed, chgnet_weight)
    return save_checkpoint(
        path, model, config, GraphConverter(), Normalizer(mean=mean, std=1.0), extra, heads=heads,
        chgnet=chgnet,
    )


def chgnet_part(seed: int, weight: float) -> Any:
    """A CHGNet GP head fitted on real CHGNet features of sample structures (random targets)."""
    from voltage_model.artifact import ChgnetPart
    from voltage_model.models import chgnet_backbone
    from voltage_model.models.gp_head import GPConfig, fit_gp_head

    x, _ = chgnet_backbone.featurise(sample_structures(12, seed=seed))
    y = np.random.default_rng(seed).normal(size=len(x))
    head = fit_gp_head(torch.from_numpy(x), y, GPConfig()).eval()
    return ChgnetPart(head, Normalizer(mean=3.0, std=1.0), chgnet_backbone.spec(), weight)


def _publish_kwargs(spec: int | Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": spec} if isinstance(spec, int) else dict(spec)


@dataclass(frozen=True)
class MlflowStore:
    """A sqlite tracking/registry store with a local artifact folder."""

    root: Path

    @classmethod
    def create(cls, root: Path) -> MlflowStore:
        root.mkdir(parents=True, exist_ok=True)
        (root / "artifacts").mkdir(exist_ok=True)
        return cls(root)

    @classmethod
    def published(
        cls,
        root: Path,
        champions: Mapping[str, int | Mapping[str, Any]],
        candidates: Mapping[str, int | Mapping[str, Any]] | None = None,
    ) -> MlflowStore:
        """A new store at ``root`` with one tiny model per ion, published in the order given:
        each of ``champions`` as its ion's champion, then each of ``candidates`` with alias
        ``candidate`` only (registered, no champion). A value is the seed, or the keyword
        arguments of :meth:`publish` (``{"seed": 1, "test_mae": 0.41}``)."""
        store = cls.create(root)
        with store.active():
            for ion, spec in champions.items():
                store.publish(ion, **_publish_kwargs(spec))
            for ion, spec in (candidates or {}).items():
                store.publish(ion, **{**_publish_kwargs(spec), "alias": "candidate"})
        return store

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}

    @contextlib.contextmanager
    def active(self) -> Iterator[MlflowStore]:
        """Point this process's MLflow at the store (env and client), restoring on exit."""
        import mlflow

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        prev_uri = mlflow.get_tracking_uri() if saved["MLFLOW_TRACKING_URI"] else None
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if prev_uri is not None:
                mlflow.set_tracking_uri(prev_uri)

    def _experiment_id(self) -> str:
        import mlflow

        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        return mlflow.create_experiment(
            EXPERIMENT, artifact_location=(self.root / "artifacts").resolve().as_uri()
        )

    def publish(
        self,
        ion: str,
        seed: int = 0,
        *,
        alias: str | None = CHAMPION,
        test_mae: float = 0.5,
        checkpoint: Path | None = None,
        **build: Any,
    ) -> VersionInfo:
        """Build (or take) a checkpoint, log it as a pyfunc, register it, set ``alias``.

        Call inside :meth:`active`. ``alias=None`` registers without moving any alias (the
        registry helper always sets one, so ``candidate`` is used and left as is).
        """
        import mlflow

        from training.train.pyfunc import log_pyfunc

        ckpt_dir = self.root / "checkpoints"
        if checkpoint is None:
            checkpoint = build_checkpoint(
                ckpt_dir / f"{ion}-{seed}.pt", ion, seed, test_mae=test_mae, **build
            )
        example = cif(rocksalt())
        with mlflow.start_run(experiment_id=self._experiment_id()):
            info = log_pyfunc(checkpoint, example)
        tags = {"test_mae": test_mae, "ion": ion, "seed": seed, "split_hash": "tests"}
        return register(info.model_uri, model_name(PREFIX, ion), tags, alias=alias or "candidate")

    def set_champion(self, ion: str, version: int) -> None:
        from mlflow import MlflowClient

        MlflowClient().set_registered_model_alias(model_name(PREFIX, ion), CHAMPION, str(version))

    def delete_champion(self, ion: str) -> None:
        from mlflow import MlflowClient

        MlflowClient().delete_registered_model_alias(model_name(PREFIX, ion), CHAMPION)


# ------------------------------------------------------------------------------ servers
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} ({last})")


def http_json(
    url: str, payload: Any = None, method: str | None = None, timeout: float = 30.0,
    raw: bytes | None = None, headers: dict[str, str] | None = None,
) -> tuple[int, Any]:  # fmt: skip
    """(status, decoded JSON or text) for one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


@dataclass
class Server:
    """A ``bentoml serve`` (or other) subprocess on 127.0.0.1 with its log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    grpc_port: int | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's own process group (the arbiter and its workers), then KILL."""
        if self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout)


def start_process(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> Any:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def serve_env(home: Path, store: MlflowStore | None, **extra: str) -> dict[str, str]:
    """Environment of a test server: own BENTOML_HOME, no telemetry, one torch thread."""
    env = dict(os.environ)
    env.update(
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="True",
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn for mlflow serve
        # No fallback to the repository's pretrained release (release/): these servers must
        # answer no_champion for an ion without a champion. Tests of the release set their own.
        VOLTAGE_RELEASE_DIR="",
    )
    if store is not None:
        env.update(store.env)
    env.update(extra)
    return env


def start_bento(
    tmp: Path, env: dict[str, str], target: str = "serving.service:VoltageService",
    ready_timeout: float = 120.0, wait_ready: bool = False, cwd: Path = REPO,
) -> Server:  # fmt: skip
    """``bentoml serve`` on free HTTP and gRPC ports; waits for /healthz and the gRPC server
    (and for /readyz too when ``wait_ready``)."""
    port, grpc_port = free_port(), free_port()
    env = {**env, "VOLTAGE_GRPC_PORT": str(grpc_port)}
    cmd = [str(VENV_BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    proc = start_process(cmd, env, tmp / f"bentoml-{port}.log", cwd)
    server = Server(proc, f"http://127.0.0.1:{port}", tmp / f"bentoml-{port}.log", grpc_port)

    def up() -> bool:
        if not server.alive():
            raise RuntimeError(f"server exited:\n{server.log_tail()}")
        status, _ = http_json(f"{server.url}/models", method="GET", timeout=2)
        if status != 200:
            return False
        if wait_ready:
            return http_json(f"{server.url}/readyz", method="GET", timeout=2)[0] == 200
        return True

    try:
        wait_until(up, ready_timeout, 0.3, what=f"bentoml serve on {server.url}")
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass
    except BaseException:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"bentoml serve did not come up:\n{tail}") from None
    return server


@contextlib.contextmanager
def served(
    workdir: Path, store: MlflowStore | None = None, *, env: dict[str, str] | None = None,
    wait_ready: bool = False, **settings: str,
) -> Iterator[Server]:  # fmt: skip
    """A test module's ``bentoml serve``, stopped on exit: started in ``workdir`` (its log there)
    with ``serve_env(workdir / "bentoml_home", store, **settings)``, or with ``env`` when the
    test built it (then neither ``store`` nor ``settings``). ``wait_ready`` as in
    :func:`start_bento`."""
    if env is None:
        env = serve_env(workdir / "bentoml_home", store, **settings)
    elif store is not None or settings:
        raise TypeError("served: pass env, or store and settings, not both")
    server = start_bento(workdir, env, wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ data files
def write_drift_reference(path: Path, ions: Sequence[str]) -> Path:
    """A drift reference (CONTRACTS.md shape) where every ion saw TRAIN_ELEMENTS."""
    entry = {
        "elements": {el: 0.5 for el in TRAIN_ELEMENTS},
        "sites": {"edges": [0, 8, 16, 64, 1000], "fractions": [0.4, 0.3, 0.2, 0.1]},
        "voltage": {"edges": [-1, 2, 3, 4, 7], "fractions": [0.2, 0.3, 0.3, 0.2]},
        "n": 100,
    }
    path.write_text(json.dumps({ion: entry for ion in ions}))
    return path


def write_records(path: Path, rows: Sequence[tuple[str, str, Structure, float]]) -> Path:
    """A minimal ``records.jsonl.gz``: (material id, ion, structure, DFT voltage) per row."""
    import gzip

    with gzip.open(path, "wt") as fh:
        for mid, ion, structure, volts in rows:
            row = {
                "battery_id": f"{mid}_{ion}", "working_ion": ion, "charged_id": mid,
                "battery_avg_voltage": volts, "charged_structure": structure.as_dict(),
            }  # fmt: skip
            fh.write(json.dumps(row) + "\n")
    return path


def write_local_head(checkpoint: Path, path: Path, seed: int = 0, scale: float = 0.3) -> Path:
    """A local-voltage sidecar (``<Ion>.json``) for a checkpoint built here: seeded random linear
    maps on its real backbones' atom vectors (bias 3 V), so ``"explain": true`` answers with
    per-site voltages that differ between sites (the fit itself: tests/serving/test_explain.py)."""
    from voltage_model.local_voltage import LocalVoltageHead, backbone_fingerprint
    from voltage_model.predict import VoltageModel

    loaded = VoltageModel.from_checkpoint(checkpoint).loaded
    n, dim = len(loaded.backbones()), loaded.model.config.atom_fea_len
    rng = np.random.default_rng(seed)
    weights = tuple(tuple(float(w) for w in rng.normal(scale=scale, size=dim)) for _ in range(n))
    head = LocalVoltageHead(weights, (3.0,) * n, backbone_fingerprint(loaded))
    head.save(path)
    return path


def corrupt_version(ion: str, version: int) -> Path:
    """Overwrite a registered version's checkpoint artifact with garbage (call inside
    ``MlflowStore.active``): the version stays registered but can no longer be loaded."""
    import yaml
    from mlflow import MlflowClient

    name = model_name(PREFIX, ion)
    uri = MlflowClient().get_model_version_download_uri(name, str(version))
    root = Path(urllib.parse.urlparse(uri).path)
    doc = yaml.safe_load((root / "MLmodel").read_text())
    rel = doc["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    target = root / rel
    target.write_bytes(b"not a checkpoint")
    return target
