"""One ion's records, split by the shared split file: what every model stage trains on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import Params, UsageError
from training.data.records import Record, read_records
from training.data.split import SPLITS, load_splits


@dataclass(frozen=True)
class IonData:
    ion: str
    parts: dict[str, list[Record]]

    def ids(self, split: str) -> list[str]:
        return [r.battery_id for r in self.parts[split]]

    def targets(self, split: str) -> np.ndarray:
        return np.array([r.battery_avg_voltage for r in self.parts[split]], dtype=np.float64)

    def formulas(self, split: str) -> list[str]:
        return [r.charged_formula for r in self.parts[split]]

    def host_ids(self, split: str) -> list[str]:
        return [r.charged_id for r in self.parts[split]]


def load_ion_data(records_path: Path, splits_path: Path, ion: str) -> IonData:
    """The ion's records in split order; every id in the split file must resolve to a record."""
    splits = load_splits(splits_path)
    if ion not in splits:
        raise KeyError(f"ion {ion!r} not in split file {splits_path} (ions: {sorted(splits)})")
    by_id = {r.battery_id: r for r in read_records(records_path) if r.working_ion == ion}
    parts: dict[str, list[Record]] = {}
    for split in SPLITS:
        missing = [b for b in splits[ion][split] if b not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} {ion} {split} ids missing from records: {missing[:3]}")
        parts[split] = [by_id[b] for b in splits[ion][split]]
    return IonData(ion=ion, parts=parts)


def train_elements(data: IonData) -> list[str]:
    els: set[str] = set()
    for rec in data.parts["train"]:
        els.update(
            sp["element"] for site in rec.charged_structure["sites"] for sp in site["species"]
        )
    return sorted(els)


def pool_partners(p: Params, ion: str, records: Path, splits: Path) -> list[IonData]:
    """The data of the ions whose training crystals ``ion``'s GP heads pool (``ions.*.pool``):
    the ion-model and cv stages must pool the same ones."""
    return [load_ion_data(records, splits, other) for other in p.pool_partners(ion)]


def uncleaned_data(records_all: Path | None, splits_all: Path | None, ion: str) -> IonData | None:
    """The ion's rows before cleaning, split as the cleaned ones (None without both files)."""
    if (records_all is None) != (splits_all is None):
        raise UsageError("--records-all and --splits-all go together")
    if records_all is None or splits_all is None:
        return None
    return load_ion_data(records_all, splits_all, ion)


def source_train_hosts(p: Params, records: Path, splits: Path) -> frozenset[str]:
    """The hosts the source backbones trained on: a CV scores no crystal on one of them."""
    return frozenset(load_ion_data(records, splits, p.source_ion).host_ids("train"))
