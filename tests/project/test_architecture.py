"""The import rule between the packages (docs/architecture.md), checked on the source (issue 18).

``voltage_model`` is what a served model is; ``training`` builds models and ``serving`` serves them.
Both import ``voltage_model``; it imports neither, ``serving`` imports nothing from ``training``,
and ``training`` nothing from ``serving``. Every import counts: module level, inside functions
(the lazy ones), under ``TYPE_CHECKING``, and ``importlib.import_module("...")`` with a literal.

Also checked here, because they follow from the same rule: the Bento packs ``voltage_model`` and
not ``training``, and every DVC stage's deps cover the code its command imports (so editing any
module a stage runs reruns it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

#: package -> top-level packages it must never import.
FORBIDDEN = {
    "voltage_model": ("training", "serving"),
    "serving": ("training",),
    "training": ("serving",),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``, wherever it sits in the file."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):  # fmt: skip
                out.append((node.lineno, arg.value))
    return out


def violations(root: Path, forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    """Every import under ``root/<package>`` that the rule forbids, as ``path:line: a -> b``."""
    found = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path.read_text()):
                if module.split(".")[0] in banned:
                    found.append(f"{path.relative_to(root)}:{line}: {package} -> {module}")
    return found


def test_the_packages_follow_the_import_rule() -> None:
    assert (REPO / "voltage_model" / "__init__.py").is_file()
    assert violations(REPO) == []


def test_the_check_catches_every_kind_of_violation(tmp_path: Path) -> None:
    """The scan is not vacuous: a synthetic package breaking the rule in each way is caught."""
    (tmp_path / "voltage_model").mkdir()
    (tmp_path / "voltage_model" / "bad.py").write_text(
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "import training.cli\n"
        "if TYPE_CHECKING:\n"
        "    from serving.models import ServedModel\n"
        "def lazy():\n"
        "    from training.registry import promote\n"
        "    return importlib.import_module('serving.watcher')\n"
    )
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "ok.py").write_text("from voltage_model.predict import VoltageModel\n")
    (tmp_path / "serving" / "bad.py").write_text("def f():\n    import training\n")
    found = violations(tmp_path)
    assert sorted(found) == [
        "serving/bad.py:2: serving -> training",
        "voltage_model/bad.py:4: voltage_model -> training.cli",
        "voltage_model/bad.py:6: voltage_model -> serving.models",
        "voltage_model/bad.py:8: voltage_model -> training.registry",
        "voltage_model/bad.py:9: voltage_model -> serving.watcher",
    ]


def test_the_default_tracking_store_is_named_once_in_effect() -> None:
    """``training.tracking`` keeps its own constant; it must equal the one serving reads."""
    from training.tracking import DEFAULT_DB
    from voltage_model.naming import DEFAULT_TRACKING_DB

    assert DEFAULT_DB == DEFAULT_TRACKING_DB


def test_the_bento_packs_the_model_package_not_training() -> None:
    include = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    assert "voltage_model/**/*.py" in include
    assert not [p for p in include if p.startswith("training")]
    # every module of serving/ and voltage_model/ is in it (a new subpackage is not left behind)
    code = [f.relative_to(REPO) for pkg in ("serving", "voltage_model")
            for f in (REPO / pkg).rglob("*.py") if "__pycache__" not in f.parts]  # fmt: skip
    packed = {f.relative_to(REPO) for p in include for f in REPO.glob(p)}
    missing = sorted(str(f) for f in set(code) - packed)
    assert not missing, f"bentofile.yaml leaves out {missing}"


# ------------------------------------------------------------------------------ DVC deps
def _module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _closure(modules: set[str]) -> set[Path]:
    """Files of ``training``/``voltage_model`` that importing ``modules`` runs (parents too)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        for _, name in imported_modules(path.read_text()):
            if name.split(".")[0] in ("training", "voltage_model"):
                todo.append(name)
        for node in ast.walk(ast.parse(path.read_text())):  # from package import submodule
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                todo.extend(f"{node.module}.{a.name}" for a in node.names)
    return seen


def _command_imports() -> dict[str, set[str]]:
    """Per ``voltage`` command function: the modules it (and the helpers it calls) imports."""
    tree = ast.parse((REPO / "training" / "cli.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def of(name: str, seen: set[str]) -> set[str]:
        if name in seen:
            return set()
        seen.add(name)
        out = {m for _, m in imported_modules(ast.unparse(funcs[name]))}
        for node in ast.walk(funcs[name]):
            if isinstance(node, ast.ImportFrom) and node.module:
                out |= {f"{node.module}.{a.name}" for a in node.names}
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in funcs:
                out |= of(node.func.id, seen)
        return out

    return {name: of(name, set()) for name in funcs}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]))
def test_each_stage_depends_on_the_code_it_runs(stage: str) -> None:
    """The code a stage runs: the modules its ``voltage`` command imports, transitively, but not
    ``training/cli.py`` itself nor the empty ``training/stages/__init__.py`` (every stage's
    dispatcher and package: editing them would rerun everything)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    body = spec.get("do", spec)
    deps = [str(d) for d in body["deps"]]
    commands = _command_imports()
    assert stage in commands, f"no `voltage` command function named {stage}"
    ignored = {REPO / "training" / "cli.py", REPO / "training" / "__init__.py",
               REPO / "training" / "stages" / "__init__.py"}  # fmt: skip
    missing = sorted(
        p.relative_to(REPO).as_posix()
        for p in _closure(commands[stage]) - ignored
        if not _covered(p, deps)
    )
    assert not missing, f"{stage}: deps miss code the stage runs: {missing}"


# ------------------------------------------------------------------------- stage modules
STAGES = sorted(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_its_module_and_the_command_only_calls_it(stage: str) -> None:
    """One module per DVC stage, named after it, with ``Options`` and ``run``; the ``voltage``
    command imports that module and nothing else of ``training`` (it parses, calls, prints), and
    passes its options positionally in the order (and under the names) of ``Options``."""
    import dataclasses
    import importlib

    module = importlib.import_module(f"training.stages.{stage}")
    assert callable(module.run) and dataclasses.is_dataclass(module.Options)
    fields = [f.name for f in dataclasses.fields(module.Options)]
    tree = ast.parse((REPO / "training" / "cli.py").read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == stage)
    imports = [n for n in ast.walk(func) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [
        ("training.stages", [stage])
    ]
    calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "Options"]  # fmt: skip
    assert len(calls) == 1
    for arg, field in zip(calls[0].args, fields, strict=False):
        if isinstance(arg, ast.Name):
            assert arg.id == field, f"{stage}: argument {arg.id} given as Options.{field}"
