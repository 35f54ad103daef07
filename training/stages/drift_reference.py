"""Reference statistics for drift monitoring: what each ion's *training* inputs looked like.

The service compares a sliding window of live requests with these numbers
(``serving/drift.py``), so they must come from exactly the data the champion learned from:
the training split of each ion. Three views per ion (shape fixed in docs/CONTRACTS.md,
"Drift reference"):

* ``elements``: for each element, the fraction of training structures that contain it. Any
  element with fraction 0 (absent) is "unseen" for that ion.
* ``sites``: histogram of ``charged_nsites`` (structure size drives graph size and latency, and
  is a cheap proxy for "a different kind of material").
* ``voltage``: histogram of the model's predictions on the training split when predictions are
  given (the service watches *predictions*, so like must be compared with like), else of the
  DFT targets.

Binning (open-ended end bins) and the element rule come from ``voltage_model.drift``, the module
the service bins its windows with, so both sides count alike. Unlike the service's empty windows,
a reference is never built from no values: :func:`_fractions` refuses.

Run as a DVC stage::

    python -m training.stages.drift_reference --records data/clean/records.jsonl.gz \
        --splits data/splits.json --out data/drift_reference.json [--predictions preds.json]
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data.records import Record, read_records
from voltage_model.drift import bin_fractions, check_edges, element_symbols, finite_values

log = logging.getLogger(__name__)

#: Fixed voltage bins (V vs. the metal): 0.5 V wide over -1..7 V, the range of the service's
#: ``voltage_predicted_volts`` histogram, so the dashboard and PSI talk about the same bins.
DEFAULT_VOLTAGE_EDGES = np.linspace(-1.0, 7.0, 17)
#: Fixed, roughly logarithmic bins for the number of sites in the charged cell. Fixed rather
#: than quantile edges so references of different data versions stay comparable.
DEFAULT_SITE_EDGES = np.array([1, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256], dtype=float)


def _fractions(edges: np.ndarray, values: np.ndarray, what: str) -> list[float]:
    """Bin fractions of ``values`` (``voltage_model.drift.bin_fractions``); a reference of no
    finite value would compare every window with nothing, so it is refused."""
    if finite_values(values).size == 0:
        raise ValueError(f"no finite values to bin for {what}")
    return [float(x) for x in bin_fractions(edges, values)]


def reference_stats(
    records_by_ion: Mapping[str, Sequence[Record]],
    train_ids: Mapping[str, set[str]],
    predictions: Mapping[str, np.ndarray] | None = None,
    voltage_edges: Sequence[float] | np.ndarray = DEFAULT_VOLTAGE_EDGES,
    site_edges: Sequence[float] | np.ndarray = DEFAULT_SITE_EDGES,
) -> dict[str, Any]:
    """Per-ion reference statistics of the training split, in the CONTRACTS.md shape.

    ``predictions[ion]``, when given, is aligned with that ion's *training* records in the order
    they appear in ``records_by_ion[ion]`` (i.e. ``[r for r in records if r.battery_id in
    train_ids[ion]]``). An ion without any training record is left out (nothing to compare
    with); the service then reports no drift for it rather than drift against nothing.
    """
    v_edges = check_edges(voltage_edges, "voltage_edges")
    s_edges = check_edges(site_edges, "site_edges")
    out: dict[str, Any] = {}
    for ion in sorted(records_by_ion):
        ids = train_ids.get(ion, set())
        train = [r for r in records_by_ion[ion] if r.battery_id in ids]
        if not train:
            log.warning("drift reference: no training records for %s, ion skipped", ion)
            continue
        wrong_ion = {r.working_ion for r in train} - {ion}
        if wrong_ion:
            raise ValueError(f"records_by_ion[{ion!r}] holds records of {sorted(wrong_ion)}")
        if predictions is not None and ion in predictions:
            volts = np.asarray(predictions[ion], dtype=float).reshape(-1)
            if volts.size != len(train):
                raise ValueError(
                    f"{ion}: {volts.size} predictions for {len(train)} training records"
                )
        else:
            volts = np.array([r.battery_avg_voltage for r in train], dtype=float)
        counts: dict[str, int] = defaultdict(int)
        for rec in train:
            for el in element_symbols(rec.charged_structure):
                counts[el] += 1
        n = len(train)
        sites = np.array([r.charged_nsites for r in train], dtype=float)
        out[ion] = {
            "elements": {el: counts[el] / n for el in sorted(counts)},
            "sites": {
                "edges": [float(x) for x in s_edges],
                "fractions": _fractions(s_edges, sites, f"{ion} sites"),
            },
            "voltage": {
                "edges": [float(x) for x in v_edges],
                "fractions": _fractions(v_edges, volts, f"{ion} voltage"),
            },
            "n": n,
        }
    return out


def write_reference(path: str | Path, stats: Mapping[str, Any]) -> None:
    """Write the reference as stable, diffable JSON (sorted keys; NaN is refused, not written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=1, sort_keys=True, allow_nan=False) + "\n")


def build_from_files(
    records_path: Path,
    splits_path: Path,
    predictions_path: Path | Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Load records, splits and optional predictions ``{ion: {battery_id: volts}}`` (a JSON
    file or the mapping itself)."""
    from training.data.split import load_splits

    splits = load_splits(splits_path)
    by_ion: dict[str, list[Record]] = defaultdict(list)
    for rec in read_records(records_path):
        if rec.working_ion in splits:
            by_ion[rec.working_ion].append(rec)
    train_ids = {ion: set(parts["train"]) for ion, parts in splits.items()}
    preds: dict[str, np.ndarray] | None = None
    if predictions_path is not None:
        raw = (
            predictions_path
            if isinstance(predictions_path, Mapping)
            else json.loads(Path(predictions_path).read_text())
        )
        preds = {}
        for ion, by_id in raw.items():
            train = [r for r in by_ion.get(ion, []) if r.battery_id in train_ids.get(ion, set())]
            missing = [r.battery_id for r in train if r.battery_id not in by_id]
            if missing:
                raise ValueError(f"{ion}: no prediction for {len(missing)} training records")
            preds[ion] = np.array([by_id[r.battery_id] for r in train], dtype=float)
    return reference_stats(by_ion, train_ids, preds)


def model_predictions(
    records_path: Path, splits_path: Path, graphs_path: Path, checkpoints: Mapping[str, Path],
    chgnet: Any = None,
) -> dict[str, dict[str, float]]:
    """Each ion's own model on its training split, as served (a CHGNet head reads ``chgnet``,
    the ``chgnet_features`` stage's features): the reference for the served predictions."""
    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.train.served import served_mean_std
    from voltage_model.artifact import load_checkpoint

    store = GraphStore.load(graphs_path)
    out: dict[str, dict[str, float]] = {}
    for ion, ckpt in checkpoints.items():
        data = load_ion_data(records_path, splits_path, ion)
        mean, _ = served_mean_std(load_checkpoint(ckpt), store, data, "train", chgnet)
        out[ion] = dict(zip(data.ids("train"), mean.tolist(), strict=True))
    return out


@dataclass(frozen=True)
class Options:
    records: Path
    splits: Path
    out: Path
    graphs: Path | None = None
    models_dir: Path | None = None
    predictions_json: Path | None = None
    chgnet_features: Path | None = None
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    """Write the reference: of the models in ``models_dir`` (their training-split predictions),
    else of ``predictions_json``, else of the DFT targets."""
    from training.chgnet_store import load_optional
    from training.config import UsageError, load_params

    predictions: Path | dict | None = opts.predictions_json
    if opts.models_dir is not None:
        if opts.graphs is None:
            raise UsageError("--models-dir needs --graphs")
        ions = [i for i in load_params(opts.params).ion_names
                if (opts.models_dir / f"{i}.pt").is_file()]  # fmt: skip
        checkpoints = {i: opts.models_dir / f"{i}.pt" for i in ions}
        predictions = model_predictions(opts.records, opts.splits, opts.graphs, checkpoints,
                                        load_optional(opts.chgnet_features))  # fmt: skip
    stats = build_from_files(opts.records, opts.splits, predictions)
    write_reference(opts.out, stats)
    return stats
