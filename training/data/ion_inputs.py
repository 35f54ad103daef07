"""What a per-ion stage builds once from its input files, handed down whole: the ion's split
records, the graph cache, its pool partners' records, the hosts the source backbones trained on,
the CHGNet features and the ion's rows before cleaning.

The ``ion_model`` and ``cv`` stages build it with ``IonInputs.load`` (so that both pool the same
partners and score the same hosts); ``interpret`` and ``chemsys_split`` build the parts they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from training.chgnet_store import ChgnetFeatures, load_optional
from training.config import Params
from training.datasets import (
    IonData,
    load_ion_data,
    pool_partners,
    source_train_hosts,
    uncleaned_data,
)
from training.graphs.store import GraphStore


@dataclass(frozen=True)
class IonFiles:
    """The files ``IonInputs.load`` reads (dvc.yaml passes them to the stage)."""

    records: Path
    splits: Path
    graphs: Path
    chgnet_features: Path | None = None
    records_all: Path | None = None  # with ``splits_all``: the rows before cleaning
    splits_all: Path | None = None


@dataclass(frozen=True)
class IonInputs:
    """One ion's inputs, built once per stage.

    ``store`` None: no graph cache (``interpret`` then builds graphs from the structures);
    ``partners``: the ions whose training crystals the ion's GP heads pool (``ions.*.pool``);
    ``source_train_hosts``: the hosts the source backbones trained on (a CV scores no crystal on
    one); ``chg``: CHGNet features (None: no CHGNet variant); ``uncleaned``: the ion's rows
    before cleaning, split as the cleaned ones.
    """

    data: IonData
    store: GraphStore | None
    source_ion: str
    partners: Sequence[IonData] = ()
    source_train_hosts: frozenset[str] = frozenset()
    chg: ChgnetFeatures | None = None
    uncleaned: IonData | None = None

    @property
    def ion(self) -> str:
        return self.data.ion

    @property
    def is_source(self) -> bool:
        return self.data.ion == self.source_ion

    @classmethod
    def load(cls, p: Params, ion: str, files: IonFiles) -> IonInputs:
        """Everything the ``ion_model`` and ``cv`` stages read about ``ion``."""
        return cls(
            data=load_ion_data(files.records, files.splits, ion),
            store=GraphStore.load(files.graphs),
            source_ion=p.source_ion,
            partners=pool_partners(p, ion, files.records, files.splits),
            source_train_hosts=source_train_hosts(p, files.records, files.splits),
            uncleaned=uncleaned_data(files.records_all, files.splits_all, ion),
            chg=load_optional(files.chgnet_features),
        )
