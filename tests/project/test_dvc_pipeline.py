"""Real DVC: the data stages run from a snapshot, a rerun skips, push/pull round-trips the data."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_mini_snapshot

pytestmark = pytest.mark.slow

DATA_OUTPUTS = [
    "data/records.jsonl.gz", "data/splits_all.json", "data/clean/records.jsonl.gz",
    "data/splits.json",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("MP_API_KEY", None)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _dvc(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throwaway copy of the project (code, dvc.yaml, params) pointed at a mini snapshot."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(REPO / "training", proj / "training", ignore=shutil.ignore_patterns("__pyc*"))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["snapshot_dir"] = str(write_mini_snapshot(tmp_path / "snapshot"))
    params["data"]["workers"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], proj)
    _dvc("init", "-q", cwd=proj)
    _dvc("remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=proj)
    return proj


def test_repro_skip_push_pull(project: Path):
    out = _dvc("repro", "clean", cwd=project)
    assert "Running stage 'ingest'" in out and "Running stage 'split'" in out
    assert out.index("Running stage 'split'") < out.index("Running stage 'clean'")
    digests = {p: _digest(project / p) for p in DATA_OUTPUTS}

    again = _dvc("repro", "clean", cwd=project)
    assert "Running stage" not in again, again

    _dvc("push", "--with-deps", "clean", cwd=project)
    shutil.rmtree(project / ".dvc" / "cache")
    for p in DATA_OUTPUTS:
        (project / p).unlink()
    _dvc("pull", "--with-deps", "clean", cwd=project)
    assert {p: _digest(project / p) for p in DATA_OUTPUTS} == digests

    # Changing a parameter reruns exactly the dependent stages.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc("repro", "clean", cwd=project)
    assert "Running stage 'split'" in changed and "Running stage 'ingest'" not in changed
    assert "Running stage 'clean'" in changed
