"""A CHGNet-serving artifact for the benchmarks, built from the pipeline's own outputs.

Why: speed figures must come from a model of the served size (the ion's real CGCNN ensemble and a
GP head with as many training rows as the ``ion_model`` stage fits), even before a pipeline run
has chosen a CHGNet variant for any ion. ``build`` takes an existing checkpoint (its CGCNN part is
kept as is), fits the CHGNet GP head on the ion's training crystals exactly as the stage does
(``training.chgnet_heads.fit_chgnet_head`` on the ``chgnet_features`` stage's features), and writes
a schema-5 artifact with the head's share ``weight`` (1: CHGNet alone; 0.5: the equal mixture).

The numbers it predicts are those of a real fitted head; only the variant is forced, so do not read
accuracy into them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running the benches without installing
    sys.path.insert(0, str(ROOT))

DATA = {
    "records": ROOT / "data/clean/records.jsonl.gz",
    "splits": ROOT / "data/splits.json",
    "graphs": ROOT / "data/graphs/graphs.pt",
    "chgnet": ROOT / "data/features/chgnet.npz",
}


def build(checkpoint: Path, ion: str, weight: float, out: Path) -> Path:
    """Write ``checkpoint`` plus a CHGNet GP head of ``ion`` with share ``weight`` to ``out``."""
    from training.chgnet_heads import fit_chgnet_head
    from training.chgnet_store import load
    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from voltage_model.artifact import ChgnetPart, load_checkpoint, save_checkpoint
    from voltage_model.models.gp_head import GPConfig

    missing = [str(p) for p in DATA.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"pipeline outputs missing (run dvc repro first): {missing}")
    src = load_checkpoint(checkpoint)
    data = load_ion_data(DATA["records"], DATA["splits"], ion)
    fit = fit_chgnet_head(data, GraphStore.load(DATA["graphs"]), load(DATA["chgnet"]), GPConfig())
    part = ChgnetPart(fit.part.head, fit.part.normalizer, fit.part.spec, weight)
    (first, first_heads), *rest = src.backbones()
    return save_checkpoint(
        out, first, src.model_config, src.converter_dict, src.normalizer,
        {**src.extra, "ion": ion, "served_variant": "chgnet" if weight >= 1 else "average"},
        heads=first_heads or None, members=[(m, h or None) for m, h in rest], chgnet=part,
    )  # fmt: skip


def n_train(ion: str) -> int:
    """Training rows of ``ion``'s CHGNet head (the GP's size, which sets its cost)."""
    from training.datasets import load_ion_data

    return len(load_ion_data(DATA["records"], DATA["splits"], ion).parts["train"])
