"""Logging a checkpoint as the MLflow pyfunc a registered model is, with derived requirements.

The logged model is ``voltage_model/pyfunc.py`` (models from code) over the weights-only
checkpoint, and it carries the whole ``voltage_model`` package as its code. Its pip requirements
are not a hand-written list (one missed packages the served code imports, so ``mlflow models
serve`` failed outside this virtualenv): :func:`pyfunc_requirements` derives them.

1. What the served code imports: every absolute import (module level, inside functions, under
   ``TYPE_CHECKING``, ``importlib.import_module("...")`` literals) of every file the model
   carries, i.e. each ``code_paths`` package in full plus the ``python_model`` file. The whole
   package rather than the closure from the pyfunc's entry: every shipped file may run.
2. Minus the standard library and the model's own code (``voltage_model``).
3. Each remaining module to the installed distribution that provides it
   (``importlib.metadata.packages_distributions()``). Where several share a top-level name the
   ones whose files hold that very module are kept, then those another candidate already
   requires are dropped: ``mlflow.pyfunc`` -> ``mlflow`` (not ``mlflow-skinny``/``-tracing``),
   ``pymatgen.core`` -> ``pymatgen-core``.
4. Each distribution's version from ``requirements.lock``, the one place versions are pinned
   (scripts/setup.sh installs it, the Bento packs it, tests/training/test_pyfunc_requirements.py
   checks pyproject.toml agrees with it). A local version label is dropped (``torch==2.13.0+cpu`` ->
   ``torch==2.13.0``): it names a build, not a version; pip with PyTorch's CPU index picks the CPU
   build, plain PyPI the default one. A distribution missing from the lock is an error.

What those distributions pull in is not a requirement but is pinned too: the lock's versions of
their dependency closure (as installed here) go to the model's ``constraints.txt``
(:func:`pyfunc_constraints`, MLflow's ``-c`` support), so a fresh environment gets the tested
combination. tests/training/test_pyfunc_requirements.py loads and runs a logged model in a process
that can import nothing but what the requirements install; bench/portable_pyfunc.py serves a
registered version with ``mlflow models serve`` from a fresh virtualenv of its requirements.
"""

from __future__ import annotations

import ast
import sys
import tempfile
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

import voltage_model
import voltage_model.pyfunc
from voltage_model.naming import CHECKPOINT_KEY

#: The one source of pinned versions (the repository root's lock file).
LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
#: What the logged model carries: the pyfunc file and the packages shipped as its code.
PYTHON_MODEL = Path(voltage_model.pyfunc.__file__)
CODE_PATHS = (Path(voltage_model.__file__).parent,)


class RequirementsError(RuntimeError):
    """The served code imports something the requirements cannot name or pin."""


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``PyYAML`` -> ``pyyaml``)."""
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


# ------------------------------------------------------------------------------ served imports
def imports_of(source: str) -> set[str]:
    """Every absolute module ``source`` imports, wherever the import sits."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):  # fmt: skip
                out.add(arg.value)
    return out


def served_files(
    python_model: Path = PYTHON_MODEL, code_paths: Sequence[Path] = CODE_PATHS
) -> list[Path]:
    """The Python files a logged model carries: its code packages in full and the model file."""
    files = {python_model.resolve()}
    for root in code_paths:
        files.update(p.resolve() for p in Path(root).rglob("*.py"))
    return sorted(files)


def own_modules(python_model: Path = PYTHON_MODEL,
                code_paths: Sequence[Path] = CODE_PATHS) -> frozenset[str]:  # fmt: skip
    """Top-level names of the model's own code (never a requirement)."""
    return frozenset({Path(p).name for p in code_paths} | {python_model.stem})


def third_party_imports(
    python_model: Path = PYTHON_MODEL, code_paths: Sequence[Path] = CODE_PATHS
) -> set[str]:
    """Modules the served code imports that are neither standard library nor its own."""
    own = own_modules(python_model, code_paths)
    found: set[str] = set()
    for path in served_files(python_model, code_paths):
        for module in imports_of(path.read_text()):
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in own:
                found.add(module)
    return found


# ------------------------------------------------------------------------------ distributions
@cache
def _top_level_index() -> dict[str, tuple[str, ...]]:
    return {k: tuple(sorted(set(v))) for k, v in metadata.packages_distributions().items()}


@cache
def _files(dist: str) -> frozenset[str]:
    return frozenset(str(f) for f in metadata.distribution(dist).files or ())


def _owns(dist: str, module: str) -> bool:
    """Whether ``dist``'s files hold ``module`` (source, compiled extension, package or a part
    of a namespace package)."""
    from importlib.machinery import all_suffixes

    base = module.replace(".", "/")
    files = _files(dist)
    if any(base + suffix in files for suffix in all_suffixes()):
        return True
    return any(f.startswith(base + "/") for f in files)


def requires(dist: str, extras: Iterable[str] = ()) -> set[str]:
    """Canonical names of the distributions ``dist`` (with ``extras``) requires here."""
    from packaging.requirements import Requirement

    wanted = {""} | set(extras)
    out: set[str] = set()
    for line in metadata.distribution(dist).requires or ():
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted):
            out.add(canonical(req.name))
    return out


def requirement_closure(names: Iterable[str]) -> set[str]:
    """Canonical names of ``names`` and everything they require, transitively, as installed
    here (what ``pip install`` of ``names`` brings)."""
    from packaging.requirements import Requirement

    todo = [Requirement(n) for n in names]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        key = name + "".join(f"[{e}]" for e in sorted(req.extras))
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        try:
            todo.extend(Requirement(n) for n in sorted(requires(name, req.extras)))
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker says "not on this platform"
    return {k for k in seen if "[" not in k}


def distributions_of(module: str) -> list[str]:
    """The installed distribution(s) that provide ``module`` (see the module docstring)."""
    candidates = _top_level_index().get(module.split(".")[0], ())
    if not candidates:
        raise RequirementsError(f"the served code imports {module}, which no installed "
                                "distribution provides")  # fmt: skip
    owners = [d for d in candidates if _owns(d, module)]
    if not owners:
        raise RequirementsError(f"the served code imports {module}, which none of "
                                f"{', '.join(candidates)} holds")  # fmt: skip
    if len(owners) > 1:
        closures = {d: requirement_closure([d]) - {canonical(d)} for d in owners}
        owners = [d for d in owners
                  if not any(canonical(d) in closures[o] for o in owners if o != d)]  # fmt: skip
    return owners


# ------------------------------------------------------------------------------ pins
def read_lock(path: Path = LOCK_FILE) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version) of every ``name==version`` in the lock."""
    if not path.is_file():
        raise RequirementsError(f"{path} not found: the pyfunc's versions come from the lock file")
    pins: dict[str, tuple[str, str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise RequirementsError(f"{path}: {raw!r} is not pinned as name==version")
        pins[canonical(name.split("[")[0].strip())] = (name.split("[")[0].strip(), version.strip())
    return pins


def pinned(dist: str, lock: dict[str, tuple[str, str]]) -> str:
    from packaging.version import Version

    try:
        name, version = lock[canonical(dist)]
    except KeyError:
        raise RequirementsError(
            f"the served code needs {dist}, which {LOCK_FILE.name} does not pin"
        ) from None
    return f"{name}=={Version(version).public}"


def pyfunc_requirements(
    lock_file: Path = LOCK_FILE,
    python_model: Path = PYTHON_MODEL,
    code_paths: Sequence[Path] = CODE_PATHS,
) -> list[str]:
    """The logged model's pip requirements, derived from its code and the lock (sorted)."""
    lock = read_lock(lock_file)
    dists = {
        canonical(d): d
        for module in third_party_imports(python_model, code_paths)
        for d in distributions_of(module)
    }
    return [pinned(dists[k], lock) for k in sorted(dists)]


def pyfunc_constraints(requirements: Sequence[str], lock_file: Path = LOCK_FILE) -> list[str]:
    """The lock's pins of everything ``requirements`` pull in (as installed here) but do not
    name: logged as the model's ``constraints.txt``, so pip rebuilds the combination the model
    was tested with rather than whatever is newest. Distributions the lock does not pin
    (``setuptools``) are left free."""
    from packaging.requirements import Requirement

    lock = read_lock(lock_file)
    named = {canonical(Requirement(r).name) for r in requirements}
    return [pinned(lock[k][0], lock)
            for k in sorted(requirement_closure(requirements) - named) if k in lock]  # fmt: skip


# ------------------------------------------------------------------------------ logging
def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "structure"), ColSpec("string", "format")]),
        outputs=Schema([ColSpec("double", "voltage"), ColSpec("double", "uncertainty")]),
    )


def log_pyfunc(checkpoint: Path, example_cif: str) -> Any:
    """Log the checkpoint as an MLflow pyfunc (models from code); returns the ModelInfo."""
    import mlflow

    requirements = pyfunc_requirements()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pyfunc_constraints(requirements)) + "\n")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYTHON_MODEL),
            artifacts={CHECKPOINT_KEY: str(checkpoint)},
            code_paths=[str(p) for p in CODE_PATHS],
            signature=_signature(),
            input_example=pd.DataFrame({"structure": [example_cif], "format": ["cif"]}),
            pip_requirements=[*requirements, f"-c {constraints}"],
        )
