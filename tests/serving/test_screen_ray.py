"""``voltage-serve screen --engine ray``: the same screen on a real Ray cluster (issue 20).

A real cluster is started for the module with ``ray start --head`` in a subprocess: bound to
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from swapping the loopback address
for the machine's), 2 CPUs, no dashboard, usage stats off, token authentication with a token made
for the test (nothing written to ``~/.ray``), and killed by its process group at the end. The
driver (this process, as ``voltage-serve screen`` would be) joins it by address. Inputs, broken
files and the tiny real checkpoint are those of ``tests/serving/test_screen.py``; the Ray figures
must equal the single-process ones exactly (same batches), resume must skip what is done, bad files
must be reported alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymatgen.io.cif import CifWriter
from typer.testing import CliRunner

from serving.screen.inputs import iter_contents, list_inputs, storage_order
from serving.screen.outputs import worker_lines
from serving.screen.partial import partial_path, read_partial
from serving.screen.ray_engine import RAY_REQUIREMENT, RayEngine, RaySettings, run_screen_ray
from serving.screen.run import _chunks, _tier2_jobs, run_screen, tier1_batches, tier2_batches
from tests.serving.test_screen import BAD, read_csv, tar_of, tiny_model, write_inputs
from tests.serving.test_screen_tiers import champions  # noqa: F401 (a fixture: CHGNet-serving models)

# Not imported here: Ray reads its settings from the environment on import, which the cluster
# fixture sets first.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason=f"Ray is not installed: pip install '{RAY_REQUIREMENT}'",
)

RAY_BIN = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 120
#: The driver's and the cluster's environment: loopback only, no usage stats, token
#: authentication with a token of this test session (Ray would otherwise write ~/.ray/auth_token).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps 127.0.0.1 from being swapped for the LAN IP
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs), its head's address; torn down after.
    ``RAY_ENV`` is set in this process too while the module runs."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--ray-client-server-port", str(_free_port()),
           "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", temp,
           "--disable-usage-stats"]  # fmt: skip
    log = open(Path(temp) / "head.log", "w+")  # noqa: SIM115 (closed in the finally below)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        mp.setenv("RAY_TMPDIR", temp)  # a private Ray's session files too (removed below)
        if "ray" in sys.modules:  # imported before: refresh what Ray read from the environment
            from ray._private import ray_constants
            from ray._raylet import Config

            mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
            Config.initialize("")
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while "Ray runtime started" not in Path(log.name).read_text():
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start failed:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.5)
            yield f"127.0.0.1:{port}"
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            _stop(head)
            log.close()
            subprocess.run(["rm", "-rf", temp], check=False)


def _stop(head: subprocess.Popen) -> None:
    """Stop the head and everything it started: its process group, which this test created
    (SIGTERM, then SIGKILL for whatever of the group is left)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=10)


def local_screen(root: Path, model, out: Path, **kw):
    kw.setdefault("progress", False)
    return run_screen(root, ["Li"], {"Li": model}, out, out.with_suffix(".json"), **kw)


def ray_screen(root: Path, blob: bytes, out: Path, address: str, **kw):
    kw.setdefault("progress", False)
    return run_screen_ray(root, ["Li"], {"Li": blob}, out, out.with_suffix(".json"),
                          RaySettings(address=address), **kw)  # fmt: skip


def records_of(out: Path) -> dict[str, dict]:
    return read_partial(partial_path(out))[1]


# =============================================================================== planning
def test_planned_batches_are_the_local_runs_batches(tmp_path):
    """The Ray engine plans its batches before reading; they must be the ones the local run
    cuts while reading, for every input kind, so each structure sees the same batch."""
    root = tmp_path / "in"
    write_inputs(root)
    tgz = tar_of(root, tmp_path / "in.tar.gz", reverse=True)
    zpath = tmp_path / "in.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*"), reverse=True):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    for inputs in (root, tgz, zpath):
        formats = list_inputs(inputs)
        todo = sorted(formats)[1:]  # as after a resume
        order = storage_order(inputs, todo)
        assert order == [k for k, _ in iter_contents(inputs, todo)]
        local = [[k for k, _, _ in c] for c in _chunks(inputs, todo, formats, 3)]
        assert tier1_batches(order, 3) == local
        two = {k: ("Li",) for k in todo}
        jobs = _tier2_jobs(inputs, two, formats)
        assert tier2_batches(order) == [[j.id for j in c] for c in jobs]
    assert storage_order(tgz, list_inputs(tgz)) != sorted(list_inputs(tgz))  # really reordered


# =============================================================================== cluster
def test_ray_screen_is_the_local_screen_resumes_and_reports_workers(ray_address, tmp_path):
    root = tmp_path / "in"
    good = write_inputs(root)
    model = tiny_model(tmp_path / "li.pt")
    blob = (tmp_path / "li.pt").read_bytes()
    local = tmp_path / "local.csv"
    expected = local_screen(root, model, local, batch_size=2)

    # An interrupted screen (4 ids done, a torn line), resumed on Ray: one partial file, one rule,
    # whichever engine wrote it (the third run below resumes a file Ray wrote).
    out = tmp_path / "ray.csv"
    first = local_screen(root, model, out, batch_size=2, limit=4)
    assert first["n_new"] == 4
    with partial_path(out).open("a") as fh:
        fh.write('{"id": "cif/s5.cif", "pred"')  # a crash mid-write
    second = ray_screen(root, blob, out, ray_address, batch_size=2)
    total = len(list_inputs(root))
    assert second["n_new"] == total - 4  # the 4 done ids are skipped, the torn one redone
    assert second["engine"]["name"] == "ray"
    assert second["engine"]["address"] == ray_address  # really on the cluster

    # Identical to the single-process run: records (figures to the bit), CSVs, summary.
    assert records_of(out) == records_of(local)
    assert read_csv(out) == read_csv(local)
    assert len(read_csv(out)) == len(good)
    errors = read_csv(out.with_suffix(".errors.csv"))
    assert errors == read_csv(local.with_suffix(".errors.csv"))
    assert {r["id"]: r["kind"] for r in errors} == BAD
    assert second["per_ion"] == expected["per_ion"] and second["n_errors"] == len(BAD)

    # Per-worker throughput, from the actors' own timings.
    workers = second["engine"]["per_worker"]["tier1"]
    assert sum(w["structures"] for w in workers) == total - 4
    assert sum(w["batches"] for w in workers) == -(-(total - 4) // 2)
    for w in workers:
        assert w["worker"].startswith("127.0.0.1:")
        assert w["structures_per_second"] > 0 and w["load_seconds"] > 0
    lines = worker_lines(second)
    assert len(lines) == len(workers) and all("structures/s" in line for line in lines)
    print("\n".join(lines))

    third = ray_screen(root, blob, out, ray_address, batch_size=2)
    assert third["n_new"] == 0 and third["per_ion"] == second["per_ion"]
    assert third["engine"]["per_worker"] == {}  # nothing to do: no Ray job at all
    _, records, done = read_partial(partial_path(out))
    assert len(records) == total and done["n_selected"] == total


def test_cli_engine_ray_screens_an_archive_like_the_local_run(ray_address, tmp_path):
    from serving.cli import app

    root = tmp_path / "in"
    write_inputs(root)
    tiny_model(tmp_path / "li.pt")
    tgz = tar_of(root, tmp_path / "in.tar.gz", reverse=True)
    base = ["screen", str(tgz), "--ions", "Li", "--checkpoint", f"Li={tmp_path / 'li.pt'}",
            "--batch-size", "3", "--no-progress"]  # fmt: skip
    runner = CliRunner()
    local = tmp_path / "local.csv"
    res = runner.invoke(app, [*base, "--out", str(local), "--summary", str(tmp_path / "l.json"),
                              "--workers", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "ray.csv"
    res = runner.invoke(app, [*base, "--out", str(out), "--summary", str(tmp_path / "r.json"),
                              "--engine", "ray", "--ray-address", ray_address,
                              "--ray-actors", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    print(res.output)
    assert records_of(out) == records_of(local)
    assert read_csv(out) == read_csv(local)
    assert read_csv(out.with_suffix(".errors.csv")) == read_csv(local.with_suffix(".errors.csv"))
    assert f"{len(BAD)} unusable" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["engine"]["address"] == ray_address
    assert "tier 1 worker 127.0.0.1:" in res.output and "structures/s" in res.output


def test_private_ray_on_this_machine(ray_address, tmp_path):
    """Without an address the engine starts a Ray of its own here (1 CPU; ``ray_address`` only
    for its environment) and stops it afterwards."""
    import ray

    root = tmp_path / "in"
    write_inputs(root)
    model = tiny_model(tmp_path / "li.pt")
    local_screen(root, model, tmp_path / "local.csv", limit=5)
    res = run_screen_ray(root, ["Li"], {"Li": (tmp_path / "li.pt").read_bytes()},
                         tmp_path / "ray.csv", tmp_path / "ray.json",
                         RaySettings(local_cpus=1), limit=5, progress=False)  # fmt: skip
    assert not ray.is_initialized()  # shut down again
    assert res["engine"]["workers"] == 1 and res["engine"]["address"] != ray_address
    assert records_of(tmp_path / "ray.csv") == records_of(tmp_path / "local.csv")


def test_an_actor_whose_model_differs_from_the_drivers_refuses(ray_address, tmp_path):
    """A node with other code or element data would load other weights from the same bytes;
    simulated by shipping another checkpoint than the driver's: the actor refuses, naming why."""
    root = tmp_path / "in"
    write_inputs(root)
    driver = tiny_model(tmp_path / "a.pt", seed=0)
    tiny_model(tmp_path / "b.pt", seed=1)
    blobs = {"Li": (tmp_path / "b.pt").read_bytes()}
    out = tmp_path / "s.csv"
    from ray.exceptions import RayError

    engine = RayEngine(blobs, RaySettings(address=ray_address), progress=False)
    with pytest.raises(RayError, match="run the same code and element data on every node"), engine:
        run_screen(root, ["Li"], {"Li": driver}, out, out.with_suffix(".json"), engine=engine,
                   progress=False)  # fmt: skip
    assert len(records_of(out)) == 0  # nothing written but the header


# =============================================================================== errors
def test_cli_engine_errors_exit_2(tmp_path, monkeypatch):
    from serving.cli import app

    root = tmp_path / "in"
    write_inputs(root)
    tiny_model(tmp_path / "li.pt")
    base = ["screen", str(root), "--ions", "Li", "--checkpoint", f"Li={tmp_path / 'li.pt'}",
            "--out", str(tmp_path / "s.csv"), "--summary", str(tmp_path / "s.json")]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--engine", "spark"])
    assert res.exit_code == 2 and "--engine must be local or ray" in res.output
    res = runner.invoke(app, [*base, "--engine", "ray", "--ray-actors", "0"])
    assert res.exit_code == 2 and "actors" in res.output
    monkeypatch.setitem(sys.modules, "ray.data", None)  # as if Ray were not installed
    res = runner.invoke(app, [*base, "--engine", "ray"])
    assert res.exit_code == 2, res.output
    assert f'pip install "{RAY_REQUIREMENT}"' in res.output
    assert not (tmp_path / "s.partial.jsonl").exists()  # refused before anything was done


# =============================================================================== tier 2
@pytest.mark.slow
def test_tier2_on_ray_is_the_local_tier2(ray_address, champions, tmp_path):  # noqa: F811
    """Champions serving CHGNet: the Ray actors re-score the same selection in the same batches
    (CHGNet loaded in each actor), a structure CHGNet refuses is reported alike."""
    from serving.screen.run import Rescore
    from tests.serving.test_screen_tiers import ISOLATED, candidates

    root = tmp_path / "in"
    for key, s in candidates().items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(str(CifWriter(s)))
    mg, na = champions["blend"], champions["cgcnn"]
    models = {"Mg": mg, "Na": na}
    # every candidate re-scored: which ones a smaller selection takes depends on the tier-1
    # figures of the tiny fixture champions, and the refused cell must always be among them
    kw = {"rescore": Rescore(len(candidates()), 0), "batch_size": 4, "progress": False}
    local = tmp_path / "local.csv"
    expected = run_screen(root, ["Mg", "Na"], models, local, local.with_suffix(".json"), **kw)
    out = tmp_path / "ray.csv"
    blobs = {ion: Path(m.path).read_bytes() for ion, m in models.items()}
    res = run_screen_ray(root, ["Mg", "Na"], blobs, out, out.with_suffix(".json"),
                         RaySettings(address=ray_address), **kw)  # fmt: skip
    assert records_of(out) == records_of(local)
    assert read_csv(out) == read_csv(local)
    assert res["per_ion"] == expected["per_ion"] and res["per_ion"]["Mg"]["n_tier2"] > 0
    assert "error" in records_of(out)[ISOLATED]["tier2"]["Mg"]
    workers = res["engine"]["per_worker"]
    assert set(workers) == {"tier1", "tier2"}
    assert sum(w["structures"] for w in workers["tier2"]) == res["tiers"]["tier2"]["structures"]
    print("\n".join(worker_lines(res)))
