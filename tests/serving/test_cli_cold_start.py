"""What a cold ``voltage-serve`` imports and how its process ends (issue 17.4).

Why: the command line must answer in seconds from a fresh process, and most of a cold start is
imports (torch, CHGNet, pymatgen) and, after the answer, the interpreter's teardown of them. No
test here times anything (speed is measured by ``bench/cli_cold_start.py``); they pin the
structure that makes it fast: ``--help`` and a refused file import no model code, torch, CHGNet,
MLflow or the HTTP client; a model without a CHGNet head never imports CHGNet; a local prediction
ends its process as soon as the answer is out (the same answer, the same exit status), but only
when the process is the command itself, never a test runner or a program that called ``app()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_fixtures import REPO, build_checkpoint, cif, rocksalt

OMP = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
WATCHED = ("torch", "chgnet", "mlflow", "voltage_model.predict", "http.client", "urllib.request",
           "numpy", "pymatgen.core")  # fmt: skip


def _cli(*args: str, env: dict[str, str], argv0: str = "-c") -> subprocess.CompletedProcess[str]:
    """``app()`` in a fresh interpreter; at a normal exit, stderr gets a line ``TEARDOWN [...]``
    naming the watched modules that were imported (none when the process ended at once).
    ``argv0="voltage-serve"`` makes the process the command itself, as the console script is."""
    code = (f"import atexit, sys; sys.argv[0] = {argv0!r}; atexit.register(lambda: print("
            f"'TEARDOWN', sorted(m for m in {WATCHED!r} if m in sys.modules), file=sys.stderr)); "
            "from serving.cli import app; app()")  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, **OMP, **env},
    )  # fmt: skip


def _imported(out: subprocess.CompletedProcess[str]) -> list[str]:
    line = [x for x in out.stderr.splitlines() if x.startswith("TEARDOWN")]
    assert line, f"no teardown line: {out.stderr[-2000:]}"
    return json.loads(line[-1].removeprefix("TEARDOWN ").replace("'", '"'))


@pytest.fixture(scope="module")
def cgcnn_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release whose one model (Na) is a CGCNN ensemble without any CHGNet head."""
    from training.release import ReleaseInputs, ReleaseOptions, write_release

    root = tmp_path_factory.mktemp("cgcnn-release")
    build_checkpoint(root / "ions" / "Na.pt", "Na", seed=5)
    out = root / "release"
    inputs = ReleaseInputs(root / "ions", root / "reports", None, None, REPO)
    manifest = write_release(["Na"], out, inputs, ReleaseOptions(check_n=0))
    assert manifest["models"]["Na"]["backbone"] == "cgcnn"
    return out


@pytest.fixture
def env(cgcnn_release: Path, tmp_path: Path) -> dict[str, str]:
    return {"VOLTAGE_RELEASE_DIR": str(cgcnn_release),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"}  # fmt: skip


def test_help_and_a_refused_file_import_nothing_heavy(tmp_path: Path) -> None:
    out = _cli("--help", env={})
    assert out.returncode == 0 and "predict" in out.stdout
    assert _imported(out) == []  # not even numpy or pymatgen
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 4\nnot a structure\n")
    out = _cli("predict", str(bad), "--ion", "Li", env={})
    assert out.returncode == 2 and "error: parse:" in out.stderr
    assert _imported(out) == ["numpy", "pymatgen.core"]  # parsing it, nothing more
    out = _cli("predict", str(bad), "--ion", "Li", env={}, argv0="voltage-serve")
    assert out.returncode == 2 and "error: parse:" in out.stderr  # flushed before the end
    assert "TEARDOWN" not in out.stderr


def test_a_model_without_chgnet_head_never_imports_chgnet(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "cell.cif"
    path.write_text(cif(rocksalt(4.3, "Co")))
    out = _cli("predict", str(path), "--ion", "Na", "--json", env=env)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"] == {"name": "electrode-voltage-Na", "version": 0, "source": "release"}
    imported = _imported(out)
    assert "torch" in imported and "voltage_model.predict" in imported  # the trace sees imports
    assert not {"chgnet", "mlflow"} & set(imported), imported


def test_the_command_ends_its_process_once_the_answer_is_out(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Same answer and exit status either way; the interpreter's teardown (atexit) is skipped
    only when the process is the command itself."""
    path = tmp_path / "cell.cif"
    path.write_text(cif(rocksalt(4.3, "Co")))
    args = ("predict", str(path), "--ion", "Na", "--json")
    normal = _cli(*args, env=env)
    fast = _cli(*args, env=env, argv0="voltage-serve")
    assert normal.returncode == fast.returncode == 0, fast.stderr
    assert "TEARDOWN" in normal.stderr and "TEARDOWN" not in fast.stderr
    assert fast.stdout == normal.stdout and json.loads(fast.stdout)["voltage"] is not None
    table = _cli("predict", str(path), "--ion", "Na", env=env, argv0="voltage-serve")
    assert table.returncode == 0 and "(release)" in table.stdout, table.stderr
    missing = _cli("predict", str(path), "--ion", "K", env=env, argv0="voltage-serve")
    assert missing.returncode == 3 and "no_champion" in missing.stderr  # flushed before the end
    assert "TEARDOWN" not in missing.stderr


def test_in_process_callers_are_never_ended() -> None:
    """Tests and programs that call ``app()`` keep their process (CliRunner swaps stdout)."""
    from serving.cli import _own_process

    assert not _own_process()
