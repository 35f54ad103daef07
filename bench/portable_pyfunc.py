"""A registered model served by ``mlflow models serve`` from a virtualenv of its own requirements.

Issue 21.4 ("models that run anywhere MLflow runs"): the pyfunc's requirements are derived from
what the served code imports (``training/train/pyfunc.py``); this checks they suffice. Steps,
each timed:

1. ``registry``: a temporary MLflow store (sqlite + artifact folder) gets the model, logged with
   ``log_pyfunc`` and aliased ``champion``: the pipeline's real checkpoint ``models/ions/<Ion>.pt``
   when present (Na by default: a CHGNet GP head, so CHGNet runs too), else a tiny random CGCNN
   with a CHGNet head. ``--tracking-uri`` uses an existing registry's champion instead.
2. ``download``: the version's artifacts (``requirements.txt``, ``constraints.txt``, code).
3. ``venv``: ``python -m venv`` in a temporary folder: nothing of this repository, nothing of its
   virtualenv.
4. ``pip``: the model's own ``requirements.txt`` (with its ``-c constraints.txt``) and nothing
   else. As scripts/setup.sh does, the CPU torch pin (read from that file) goes first and alone
   with ``--extra-index-url <--torch-index>`` (every other package would otherwise ask that index
   too); then ``pip install -r requirements.txt``. The venv is then checked: it cannot import
   ``voltage_model``, ``training``, ``serving`` or ``bentoml``, and ``pip check`` passes.
5. ``serve``: ``<venv>/bin/mlflow models serve -m models:/<name>@champion --env-manager local``
   on 127.0.0.1, run from a temporary folder with a PATH that leads to that venv only (the
   scoring server is started as ``uvicorn`` from PATH), until ``/ping`` answers.
6. ``predict``: one structure (``--structure``, default tests/fixtures/CoO2.cif) posted to
   ``/invocations`` (first call, then a second); the answer must equal the in-process
   prediction of the same version (this repository's virtualenv, ``mlflow.pyfunc.load_model``).

Exit status 0: served from the clean venv and equal; 1: served but different; 2: a step failed
(the report names it, with the tail of its log).

Usage::

    python bench/portable_pyfunc.py
    python bench/portable_pyfunc.py --ion Li --out reports/bench/portable_pyfunc.json
    python bench/portable_pyfunc.py --tracking-uri sqlite:///work/mlflow/mlflow.db --ion Mg
    python bench/portable_pyfunc.py --venv /tmp/pyfunc-venv     # keep (and reuse) the venv
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/portable_pyfunc.py` without installing
    sys.path.insert(0, str(ROOT))

TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
HIDDEN = ("voltage_model", "training", "serving", "bentoml")


class StepFailed(RuntimeError):
    def __init__(self, step: str, message: str, log: str = "") -> None:
        super().__init__(f"{step}: {message}")
        self.step, self.log = step, log


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)
            print(f"[{name}] {self.seconds[name]:.1f} s", flush=True)


def clean_env(venv: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus anything that points into this repository or its
    virtualenv: no PYTHONPATH, no VIRTUAL_ENV, PATH led by ``venv``'s bin and stripped of every
    other virtualenv's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}  # fmt: skip
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and not (Path(p) / "activate").is_file()]  # fmt: skip
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra or {})
    return env


def run_logged(step: str, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path,
               timeout: float) -> str:  # fmt: skip
    """Run ``cmd``, output to ``log``; StepFailed with the log's tail unless it exits 0."""
    with log.open("ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise StepFailed(step, f"timed out after {timeout:.0f} s", tail(log)) from None
    if proc.returncode != 0:
        raise StepFailed(step, f"{cmd[0]} exited {proc.returncode}", tail(log))
    return log.read_text(errors="replace")


def tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------ steps
def publish(tmp: Path, ion: str, checkpoint: Path | None) -> tuple[dict[str, str], str]:
    """A temporary store whose ``electrode-voltage-<ion>`` champion is ``checkpoint`` (or a tiny
    model with a CHGNet head); (store env, what was published)."""
    from tests.serving_fixtures import MlflowStore

    store = MlflowStore.create(tmp / "mlflow")
    with store.active():
        if checkpoint is not None:
            store.publish(ion, checkpoint=checkpoint)
            what = str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT)
                       else checkpoint)  # fmt: skip
        else:
            store.publish(ion, seed=1, chgnet_weight=0.5)
            what = "tiny CGCNN + CHGNet GP head (tests.serving_fixtures)"
    return store.env, what


@contextmanager
def tracking(env: dict[str, str]) -> Iterator[None]:
    import mlflow

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(None)


def download(model_uri: str, env: dict[str, str], dst: Path) -> Path:
    import mlflow

    with tracking(env):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def make_venv(venv: Path, log: Path) -> None:
    if (venv / "bin" / "python").is_file():
        return  # --venv given and already built: reused (pip then adds what is missing)
    run_logged("venv", [sys.executable, "-m", "venv", str(venv)], log, clean_env(venv),
               log.parent, 300)  # fmt: skip


def pip_install(venv: Path, model_dir: Path, torch_index: str, log: Path) -> dict[str, Any]:
    reqs = model_dir / "requirements.txt"
    env = clean_env(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    torch_pin = next((ln.strip() for ln in reqs.read_text().splitlines()
                      if re.match(r"torch\s*==", ln.strip())), None)  # fmt: skip
    if torch_pin:
        run_logged("pip", [*pip, "--no-deps", "--retries", "2", "--timeout", "30",
                           "--extra-index-url", torch_index, torch_pin],
                   log, env, model_dir, 1800)  # fmt: skip
    run_logged("pip", [*pip, "-r", str(reqs)], log, env, model_dir, 3600)
    freeze = run_logged("pip", [str(venv / "bin" / "python"), "-m", "pip", "freeze"],
                        log.with_suffix(".freeze"), env, model_dir, 120)  # fmt: skip
    installed = [ln for ln in freeze.splitlines() if "==" in ln]
    # what pip could not reach (an index offline, say): its warnings, once each; a configured
    # local index without a given project says so for every project, counted, not listed
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
             if ln.startswith(("WARNING", "ERROR"))]  # fmt: skip
    absent = [ln for ln in lines if "is ignored: it is neither a file nor a directory" in ln]
    warnings = sorted({_short(ln) for ln in lines if ln not in absent})
    if absent:
        warnings.append(f"{len(absent)} lookups in a configured local index that lacks the "
                        "project (ignored by pip)")  # fmt: skip
    return {"requirements": [ln for ln in reqs.read_text().splitlines() if ln.strip()],
            "torch_pin_first": torch_pin, "installed": len(installed),
            "torch": next((ln for ln in installed if ln.lower().startswith("torch==")), None),
            "warnings": warnings[:20]}


def _short(warning: str) -> str:
    """A pip warning without urllib3's object reprs (``Retry(...)``, ``<... at 0x...>``)."""
    warning = re.sub(r"Retry\(.*?\)\) ", "", warning)
    warning = re.sub(r"<[^<>]* at 0x[0-9a-f]+>: ", "", warning)
    return warning[:400]


def check_isolated(venv: Path, cwd: Path, log: Path) -> dict[str, Any]:
    code = ("import importlib.util as u, json, sys; print(json.dumps({'python': sys.executable, "
            f"'importable': {{m: u.find_spec(m) is not None for m in {list(HIDDEN)!r}}}}}))")
    env = clean_env(venv)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, env=env, cwd=cwd, timeout=120, check=True)  # fmt: skip
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = [m for m, ok in seen["importable"].items() if ok]
    if leaked:
        raise StepFailed("isolation", f"the venv can import {leaked}: not clean")
    run_logged("isolation", [str(venv / "bin" / "python"), "-m", "pip", "check"], log, env, cwd,
               300)  # fmt: skip
    return {"python": seen["python"], "importable": seen["importable"], "pip_check": "ok"}


def serve_and_predict(
    venv: Path, model_uri: str, store_env: dict[str, str], cif: str, tmp: Path, timer: Timer,
    ready_timeout: float,
) -> tuple[list[dict[str, float]], dict[str, float]]:  # fmt: skip
    from tests.serving_fixtures import Server, free_port, http_json, start_process

    port = free_port()
    log = tmp / "mlflow-serve.log"
    cmd = [str(venv / "bin" / "mlflow"), "models", "serve", "-m", model_uri,
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    env = clean_env(venv, {**store_env, "MLFLOW_DISABLE_TELEMETRY": "true",
                           "OMP_NUM_THREADS": "1"})  # fmt: skip
    run_dir = tmp / "serve-cwd"
    run_dir.mkdir(exist_ok=True)
    payload = {"dataframe_split": {"columns": ["structure", "format"], "data": [[cif, "cif"]]}}
    server = Server(start_process(cmd, env, log, cwd=run_dir), f"http://127.0.0.1:{port}", log)
    try:
        with timer.step("serve_ready"):
            wait_ready(server, ready_timeout)
        answers, seconds = [], {}
        for call in ("first_request", "second_request"):
            t0 = time.perf_counter()
            status, body = http_json(f"{server.url}/invocations", payload, timeout=600)
            seconds[call] = round(time.perf_counter() - t0, 3)
            if status != 200:
                raise StepFailed("predict", f"HTTP {status}: {str(body)[:500]}",
                                 server.log_tail())  # fmt: skip
            answers.append(body["predictions"][0])
        return answers, seconds
    finally:
        server.stop()


def root_cause(log: Path) -> str:
    """The first ``SomethingError: ...`` line of a log (the import that failed, say)."""
    for line in log.read_text(errors="replace").splitlines():
        if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line):
            return line.strip()[:500]
    return "see the log"


def wait_ready(server: Any, timeout: float) -> None:
    """Until ``/ping`` answers 200; StepFailed if the server exits or ``timeout`` passes."""
    from tests.serving_fixtures import http_json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise StepFailed("serve", f"mlflow models serve exited: {root_cause(server.log)}",
                             server.log_tail())  # fmt: skip
        try:
            if http_json(f"{server.url}/ping", method="GET", timeout=2)[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise StepFailed("serve", f"no /ping answer after {timeout:.0f} s", server.log_tail())


def predict_here(model_uri: str, env: dict[str, str], cif: str) -> dict[str, float]:
    import mlflow
    import pandas as pd

    with tracking(env):
        model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(pd.DataFrame({"structure": [cif], "format": ["cif"]}))
    return {k: float(v) for k, v in out.to_dict("records")[0].items()}


def absolute_uri(uri: str) -> str:
    """``sqlite:///relative/path.db`` made absolute: the server runs in another folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


# ------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ion", default="Na")
    ap.add_argument("--prefix", default="electrode-voltage")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint to publish (default: models/ions/<Ion>.pt if present)")
    ap.add_argument("--tiny", action="store_true", help="publish a tiny model, not the real one")
    ap.add_argument("--tracking-uri", default=None,
                    help="serve this registry's champion instead of publishing one")
    ap.add_argument("--structure", type=Path, default=ROOT / "tests/fixtures/CoO2.cif")
    ap.add_argument("--torch-index", default=TORCH_INDEX)
    ap.add_argument("--venv", type=Path, default=None, help="build (or reuse) and keep it here")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)  # fmt: skip

    cif = args.structure.read_text()
    model_uri = f"models:/{args.prefix}-{args.ion}@champion"
    timer = Timer()
    report: dict[str, Any] = {"model_uri": model_uri, "structure": str(args.structure),
                              "python": sys.version.split()[0], "cpus": os.cpu_count()}  # fmt: skip
    status = 2
    with tempfile.TemporaryDirectory(prefix="portable-pyfunc-") as tmp_name:
        tmp = Path(tmp_name)
        venv = args.venv.resolve() if args.venv else tmp / "venv"
        try:
            with timer.step("registry"):
                if args.tracking_uri:
                    store_env = {"MLFLOW_TRACKING_URI": absolute_uri(args.tracking_uri)}
                    report["published"] = f"existing registry {args.tracking_uri}"
                else:
                    ckpt = (args.checkpoint or ROOT / f"models/ions/{args.ion}.pt").resolve()
                    store_env, what = publish(tmp, args.ion, None if args.tiny or not
                                              ckpt.is_file() else ckpt)  # fmt: skip
                    report["published"] = what
            with timer.step("download"):
                model_dir = download(model_uri, store_env, tmp / "model")
            with timer.step("venv"):
                make_venv(venv, tmp / "venv.log")
            with timer.step("pip"):
                report["pip"] = pip_install(venv, model_dir, args.torch_index, tmp / "pip.log")
            with timer.step("isolation"):
                report["isolation"] = check_isolated(venv, tmp, tmp / "check.log")
            answers, report["request_s"] = serve_and_predict(
                venv, model_uri, store_env, cif, tmp, timer, args.ready_timeout
            )
            with timer.step("in_process"):
                here = predict_here(model_uri, store_env, cif)
            report["served"], report["in_process"] = answers, here
            diff = max(abs(a[k] - here[k]) for a in answers for k in here)
            report["max_abs_diff"] = diff
            report["bit_identical"] = all(a == here for a in answers)
            report["result"] = "equal" if diff <= 1e-9 * max(1.0, abs(here["voltage"])) \
                else "DIFFERENT"  # fmt: skip
            status = 0 if report["result"] == "equal" else 1
        except StepFailed as exc:
            report["result"] = f"FAILED at {exc.step}: {exc}"
            report["log_tail"] = exc.log
            print(exc.log, file=sys.stderr)
        finally:
            report["seconds"] = timer.seconds
            if args.venv is None:
                shutil.rmtree(venv, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
