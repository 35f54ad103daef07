"""The registered pyfunc's pip requirements: derived, complete, pinned by the lock (issue 21.4).

``training.train.pyfunc.pyfunc_requirements`` walks what the served code imports and pins it from
``requirements.lock``. Here: the derivation on a synthetic package (so it is not vacuous), the
pins against the lock and this virtualenv, pyproject.toml against the lock, and, the check that
matters, a logged model (CGCNN + CHGNet heads) loaded and run in a fresh process: every
third-party module it imports comes from a distribution the requirements install, and every one
the served code imports itself is a requirement in its own right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from training.train.pyfunc import (
    LOCK_FILE,
    RequirementsError,
    canonical,
    distributions_of,
    pyfunc_constraints,
    pyfunc_requirements,
    read_lock,
    requirement_closure,
    third_party_imports,
)

REPO = Path(__file__).resolve().parents[2]


def _names(requirements: list[str]) -> set[str]:
    return {canonical(Requirement(r).name) for r in requirements}


# ------------------------------------------------------------------------------ derivation
def _package(tmp_path: Path, source: str) -> tuple[Path, Path]:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text(source)
    model = tmp_path / "model.py"
    model.write_text("import mypkg.core\nfrom mypkg import core\n")
    return model, pkg


def test_the_requirements_follow_what_the_code_imports(tmp_path: Path) -> None:
    """Module level, inside a function, under TYPE_CHECKING, import_module literals; stdlib and
    the package's own modules are not requirements; versions come from the lock given."""
    model, pkg = _package(tmp_path, (
        "from __future__ import annotations\n"
        "import json, importlib\n"
        "from typing import TYPE_CHECKING\n"
        "import numpy.linalg\n"
        "from mypkg import other\n"
        "if TYPE_CHECKING:\n"
        "    from scipy.spatial import cKDTree\n"
        "def lazy():\n"
        "    import yaml\n"
        "    return importlib.import_module('pymatgen.core')\n"
    ))  # fmt: skip
    lock = tmp_path / "lock.txt"
    lock.write_text("# pins\nnumpy==1.0\nPyYAML==2.0\nscipy==3.0\npymatgen-core==4.0+local\n")
    assert third_party_imports(model, [pkg]) == {
        "numpy.linalg", "scipy.spatial", "yaml", "pymatgen.core"
    }  # fmt: skip
    assert pyfunc_requirements(lock, model, [pkg]) == [
        "numpy==1.0", "pymatgen-core==4.0", "PyYAML==2.0", "scipy==3.0"
    ]  # fmt: skip

    lock.write_text("numpy==1.0\n")
    with pytest.raises(RequirementsError, match="does not pin"):
        pyfunc_requirements(lock, model, [pkg])
    (pkg / "core.py").write_text("import no_such_module_anywhere\n")
    with pytest.raises(RequirementsError, match="no installed distribution"):
        pyfunc_requirements(lock, model, [pkg])


def test_a_shared_top_level_name_maps_to_the_distribution_holding_the_module() -> None:
    assert distributions_of("mlflow.pyfunc") == ["mlflow"]  # not mlflow-skinny / -tracing
    assert distributions_of("pymatgen.core") == ["pymatgen-core"]
    assert distributions_of("pymatgen.optimization.neighbors") == ["pymatgen-core"]  # a .so
    assert distributions_of("yaml") == ["PyYAML"]


# ------------------------------------------------------------------------------ pins
def test_the_served_requirements_are_pinned_by_the_lock_and_installed_here() -> None:
    lock = read_lock()
    reqs = pyfunc_requirements()
    assert len(reqs) == len(_names(reqs))
    for line in reqs:
        req = Requirement(line)
        name = canonical(req.name)
        (spec,) = req.specifier
        assert spec.operator == "==" and spec.version == Version(lock[name][1]).public, line
        assert Version(metadata.version(name)).public == spec.version, f"{line}: installed differs"
    # what the served code needs beyond the old hand-written list
    assert {"torch", "mlflow", "pymatgen-core", "mendeleev", "chgnet", "pyyaml",
            "scipy", "scikit-learn", "numpy", "pandas"} <= _names(reqs)  # fmt: skip
    for line in pyfunc_constraints(reqs):
        req = Requirement(line)
        assert canonical(req.name) not in _names(reqs)
        assert str(req.specifier) == f"=={Version(lock[canonical(req.name)][1]).public}"


#: pyproject.toml pins exactly only what the code depends on release by release (its comment says
#: why); every other version lives in the lock alone.
EXACT_PINS = {"torch", "bentoml", "mlflow", "chgnet", "ruff"}


def test_pyproject_agrees_with_the_lock() -> None:
    """requirements.lock is the one source of versions; pyproject.toml names the direct
    dependencies as ranges the lock satisfies, and pins exactly only ``EXACT_PINS``."""
    lock = read_lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    wrong = []
    for line in declared:
        req = Requirement(line)
        pin = lock.get(canonical(req.name))
        if pin is None or not req.specifier.contains(Version(pin[1]), prereleases=True):
            wrong.append(f"{line} (lock: {pin[1] if pin else 'absent'})")
    assert not wrong, f"pyproject.toml disagrees with {LOCK_FILE.name}: {wrong}"
    exact = {canonical(Requirement(line).name) for line in declared if "==" in line}
    assert exact == EXACT_PINS, f"exact pins belong in {LOCK_FILE.name}: {exact - EXACT_PINS}"
    bento = (REPO / "bentofile.yaml").read_text()
    assert 'requirements_txt: "./requirements.lock"' in bento
    assert "requirements.lock" in (REPO / "scripts" / "setup.sh").read_text()


# ------------------------------------------------------------------------------ a logged model
#: Run in a fresh interpreter: hide every distribution the requirements do not install (an import
#: of it fails as if it were absent), record the served code's own imports, load the registered
#: model and predict one structure, then list the files of every module that was loaded.
PROBE = r"""
import sys
baseline = set(sys.modules)
import builtins, json, re, sysconfig
from importlib import metadata

allowed = set(json.loads(sys.argv[3]))
own = {"voltage_model"}  # found on the model's code path, before this project's editable install
index = metadata.packages_distributions()
hidden, direct = set(), set()


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


class Hide:
    def find_spec(self, name, path=None, target=None):
        dists = index.get(name) if "." not in name and name not in own else None
        if dists and not {canonical(d) for d in dists} & allowed:
            hidden.add(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


_import = builtins.__import__


def _record(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and (importer.split(".")[0] == "voltage_model"
                       or importer.startswith("code_model_")):
        direct.add(name)
    return _import(name, globals, locals, fromlist, level)


sys.meta_path.insert(0, Hide())
builtins.__import__ = _record
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"structure": [open(sys.argv[2]).read()], "format": ["cif"]}))
builtins.__import__ = _import
site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
files = set()
for name in set(sys.modules) - baseline:
    path = getattr(sys.modules[name], "__file__", None) or ""
    for root in site:
        if path.startswith(root + "/"):
            files.add(path[len(root) + 1:])
print(json.dumps({
    "files": sorted(files), "hidden": sorted(hidden), "direct": sorted(direct),
    "voltage_model": sys.modules["voltage_model"].__file__,
    "predictions": out.to_dict("records"),
}))
"""


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A registered champion with a CGCNN ensemble and a CHGNet GP head (both backbones run)."""
    from tests.serving_fixtures import MlflowStore

    store = MlflowStore.create(tmp_path_factory.mktemp("mlflow"))
    with store.active():
        version = store.publish("Li", seed=3, chgnet_weight=0.5)
    return f"models:/{version.name}@champion", store.env


def _owners() -> dict[str, set[str]]:
    """Installed file (relative to site-packages) -> canonical names of the distributions that
    install it (sometimes two: ``pynvml.py`` of nvidia-ml-py and nvidia-ml-py3)."""
    owner: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        for f in dist.files or ():
            owner.setdefault(str(f), set()).add(name)
    return owner


def test_the_logged_model_records_the_derived_requirements(logged_model) -> None:
    import mlflow

    uri, env = logged_model
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        path = Path(mlflow.pyfunc.get_model_dependencies(uri))
    finally:
        mlflow.set_tracking_uri(None)
    reqs = pyfunc_requirements()
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert lines == [*reqs, "-c constraints.txt"]
    constraints = (path.parent / "constraints.txt").read_text().split()
    assert constraints == pyfunc_constraints(reqs)


def test_the_model_loads_and_predicts_with_its_requirements_alone(logged_model, tmp_path) -> None:
    """What load + predict imports, in a process where only the requirements' distributions (and
    what they require) can be imported: it runs, answers as in this process, loads nothing from
    elsewhere, and each third-party module the served code imports is a requirement itself."""
    import mlflow
    import pandas as pd

    uri, env = logged_model
    cif = (REPO / "tests" / "fixtures" / "CoO2.cif").read_text()
    structure = tmp_path / "CoO2.cif"
    structure.write_text(cif)
    reqs = pyfunc_requirements()
    closure = requirement_closure(reqs)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, uri, str(structure), json.dumps(sorted(closure))],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**clean, **env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/voltage_model/" in seen["voltage_model"]  # the model's own copy ran

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        here = mlflow.pyfunc.load_model(uri).predict(
            pd.DataFrame({"structure": [cif], "format": ["cif"]})
        ).to_dict("records")[0]
    finally:
        mlflow.set_tracking_uri(None)
    assert seen["predictions"][0] == pytest.approx(here, rel=1e-9)

    # every module loaded from site-packages belongs to a distribution the requirements install
    owner = _owners()
    unowned = sorted(f for f in seen["files"] if f not in owner)
    assert not unowned, f"loaded from site-packages but no distribution owns: {unowned[:10]}"
    assert {"torch", "mlflow", "pymatgen-core", "chgnet"} <= set().union(
        *(owner[f] for f in seen["files"])
    )
    outside = sorted(f for f in seen["files"] if not owner[f] & closure)
    assert not outside, f"loaded, not installed by the requirements: {outside[:10]}"

    # the served code's own third-party imports: requirements in their own right (pinned)
    own = {"voltage_model"}
    direct = {m for m in seen["direct"]
              if m.split(".")[0] not in sys.stdlib_module_names | own}  # fmt: skip
    assert {m.split(".")[0] for m in direct} >= {"torch", "pymatgen", "chgnet", "numpy"}
    static = {m.split(".")[0] for m in third_party_imports()}  # top level: C code imports too
    unlisted = sorted(m for m in direct if m.split(".")[0] not in static)
    assert not unlisted, f"imported at run time but not found in the source: {unlisted}"
    required = _names(reqs)
    missing = sorted(m for m in direct
                     if not {canonical(d) for d in distributions_of(m)} & required)  # fmt: skip
    assert not missing, f"the served code imports {missing}, not in the requirements {reqs}"
