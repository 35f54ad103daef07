"""A frozen universal-potential backbone: CHGNet features of a crystal, for GP heads per ion.

Why: CHGNet (pretrained on ~1.5 million MP relaxation frames) has seen far more chemistry than
2,000 Li electrodes; its frozen atom and crystal features, with a GP head per ion, are a second
transfer source beside the Li-trained CGCNN (issue 16). The weights ship inside the ``chgnet``
wheel (``chgnet/pretrained/<version>/``), so nothing is downloaded.

The recipe (``RECIPE``), 257 numbers per crystal: CHGNet's crystal feature (64, the mean of the
last atom features, as CHGNet pools them), the mean, std and max over sites of the atom features
(3 x 64) and the predicted energy per atom (eV). An artifact whose heads read these features
records ``spec()``; loading refuses another installed CHGNet (``check_spec``), since other
weights would shift every feature.

Caveat, stated wherever these features are reported: CHGNet was trained on MP relaxation
trajectories, which very likely include these very MP structures, so its features may know their
energies; the chemical-system-grouped CV says how far that carries to new chemistry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from chgnet.graph import CrystalGraph as ChgnetGraph
    from chgnet.model import CHGNet
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

MODEL_VERSION = "0.3.0"
RECIPE = "chgnet-features-v1: crystal_fea | atom_fea mean, std, max | energy per atom"
ATOM_DIM = 64
FEATURE_DIM = ATOM_DIM * 4 + 1
BATCH_SIZE = 16
_LOCK = threading.Lock()


class ChgnetMismatch(ValueError):
    """An artifact's CHGNet features were computed by another CHGNet than the installed one."""


def package_version() -> str:
    from importlib.metadata import version

    return version("chgnet")


def spec() -> dict[str, str]:
    """What an artifact records about the features its heads read."""
    return {"name": "chgnet", "package": package_version(), "model": MODEL_VERSION,
            "recipe": RECIPE}  # fmt: skip


def check_spec(recorded: dict[str, Any] | None, where: str = "artifact") -> None:
    """Refuse an artifact fitted on another CHGNet (package, weights or recipe)."""
    if not recorded:
        raise ChgnetMismatch(f"{where}: heads read CHGNet features but record no CHGNet spec")
    installed = spec()
    diff = {k: (recorded.get(k), v) for k, v in installed.items() if recorded.get(k) != v}
    if diff:
        said = ", ".join(f"{k} {a!r} (installed {b!r})" for k, (a, b) in diff.items())
        raise ChgnetMismatch(f"{where}: CHGNet features were computed with {said}; "
                             "install the matching chgnet or retrain")  # fmt: skip


#: CHGNet's packages whose ``__init__`` imports what featurising never runs: ``chgnet.model``
#: imports its ASE dynamics (StructOptimizer, MD: ASE, pymatgen's EOS fitting, matplotlib) and
#: ``chgnet.utils`` its VASP parsers (pymatgen.io.vasp, scipy.signal): together about ten times
#: the model module's own import (bench/cli_cold_start.py, ``imports_torch_chgnet``).
_HEAVY_PACKAGES = ("chgnet.model", "chgnet.utils")


def chgnet_class() -> type[CHGNet]:
    """CHGNet's model class, imported without the package initialisers above when nothing has
    imported them yet. Why: they are most of a cold command line's time (issue 17.4).

    How: each of those packages stands in ``sys.modules`` as a bare package (its path, so its
    submodules import as usual; ``chgnet.utils`` given the helpers of ``common_utils``, all that
    the model and graph modules take from it) while ``chgnet.model.model`` imports; then the
    stand-ins are removed, so a later ``import chgnet.model`` (the relaxation's StructOptimizer)
    runs the real initialiser, which finds ``chgnet.model.model`` already loaded: one CHGNet
    class per process either way. Call under ``_LOCK``: another thread must not import those
    packages while the stand-ins are in place."""
    import importlib.util
    import sys

    done = sys.modules.get("chgnet.model.model")
    if done is not None:
        return done.CHGNet
    placed = []
    try:
        for name in _HEAVY_PACKAGES:
            if name not in sys.modules:
                sys.modules[name] = importlib.util.module_from_spec(importlib.util.find_spec(name))
                placed.append(name)
        if "chgnet.utils" in placed:
            from chgnet.utils import common_utils

            vars(sys.modules["chgnet.utils"]).update(
                {k: v for k, v in vars(common_utils).items() if not k.startswith("_")}
            )
        # import statements, not importlib: the pyfunc's requirement checks see these
        from chgnet.model.model import CHGNet

        return CHGNet
    finally:
        for name in placed:
            del sys.modules[name]


@lru_cache(maxsize=1)
def load_model() -> CHGNet:
    """The pretrained CHGNet, loaded once per process from the wheel (no download), eval mode."""
    with _LOCK:
        model = chgnet_class().load(model_name=MODEL_VERSION, use_device="cpu", verbose=False)
    return model.eval()


def to_graph(structure: Structure) -> ChgnetGraph:
    """CHGNet's own graph of one structure (its cutoffs; fails on isolated atoms)."""
    return load_model().graph_converter(structure)


def _features(crystal: np.ndarray, atoms: np.ndarray, energy: float) -> np.ndarray:
    return np.concatenate([crystal, atoms.mean(axis=0), atoms.std(axis=0), atoms.max(axis=0),
                           [energy]]).astype(np.float64)  # fmt: skip


def graph_outputs(graphs: Sequence[ChgnetGraph]) -> list[dict[str, np.ndarray]]:
    """CHGNet's energy, crystal and atom features of prepared graphs, one forward per batch."""
    if not graphs:
        return []
    model = load_model()
    out: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for i in range(0, len(graphs), BATCH_SIZE):
            pred = model.forward(list(graphs[i : i + BATCH_SIZE]), task="e",
                                 return_atom_feas=True, return_crystal_feas=True)  # fmt: skip
            for j in range(len(pred["e"])):
                out.append({"e": float(pred["e"][j]),
                            "crystal_fea": pred["crystal_fea"][j].double().numpy(),
                            "atom_fea": pred["atom_fea"][j].double().numpy()})  # fmt: skip
    return out


def graph_features(graphs: Sequence[ChgnetGraph]) -> np.ndarray:
    """(n, FEATURE_DIM) float64 features of prepared graphs."""
    rows = [_features(o["crystal_fea"], o["atom_fea"], o["e"]) for o in graph_outputs(graphs)]
    return np.array(rows, dtype=np.float64).reshape(len(rows), FEATURE_DIM)


def featurise(
    structures: Sequence[Structure], progress: Callable[[int], Any] | None = None
) -> tuple[np.ndarray, list[str | None]]:
    """Features of many structures, batch by batch; a structure CHGNet cannot graph (e.g. an
    isolated atom) gets a NaN row and its error message (None where it worked)."""
    feats = np.full((len(structures), FEATURE_DIM), np.nan)
    errors: list[str | None] = [None] * len(structures)
    for start in range(0, len(structures), BATCH_SIZE * 4):
        chunk = range(start, min(start + BATCH_SIZE * 4, len(structures)))
        graphs, where = [], []
        for i in chunk:
            try:
                graphs.append(to_graph(structures[i]))
                where.append(i)
            except (ValueError, RuntimeError, IndexError) as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
        if graphs:
            feats[where] = graph_features(graphs)
        if progress is not None:
            progress(len(chunk))
    return feats, errors


def atom_features(structure: Structure) -> np.ndarray:
    """(n_sites, ATOM_DIM) CHGNet atom features of one structure (for local voltages)."""
    return graph_outputs([to_graph(structure)])[0]["atom_fea"]
