"""Source 1 (offline, default): the MP insertion-electrode snapshot in ``../shared/data``.

Layout (see that folder's README): ``electrodes.csv`` plus ``cifs_r.tar.gz`` and
``cifs_f_supplement.tar.gz``, whose members are the paths named by ``charged_cif``.
CIFs are read straight from the tarballs, never unpacked into the project.
"""

from __future__ import annotations

import csv
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.data.ingest import DataSourceError, RawRow

CSV_NAME = "electrodes.csv"
TARBALLS = ("cifs_r.tar.gz", "cifs_f_supplement.tar.gz")
REQUIRED_COLUMNS = (
    "battery_id",
    "working_ion",
    "charged_id",
    "charged_formula",
    "battery_avg_voltage",
    "charged_cif",
)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataSourceError(f"snapshot table not found: {path}")
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataSourceError(f"{path} lacks required columns: {missing}")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataSourceError(f"snapshot table {path} is unreadable: {exc}") from None


def _read_cifs(snapshot_dir: Path, wanted: set[str]) -> dict[str, str]:
    """Read the wanted CIF members from every tarball present; a corrupt tarball stops the stage."""
    texts: dict[str, str] = {}
    present = [snapshot_dir / name for name in TARBALLS if (snapshot_dir / name).is_file()]
    if not present:
        raise DataSourceError(f"no CIF tarballs ({', '.join(TARBALLS)}) in {snapshot_dir}")
    for tar_path in present:
        try:
            with tarfile.open(tar_path, "r:gz") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and name in wanted:
                        fh = tar.extractfile(member)
                        if fh is not None:
                            texts[name] = fh.read().decode("utf-8", errors="replace")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataSourceError(f"CIF archive {tar_path} is corrupt: {exc}") from None
    return texts


def snapshot_rows(snapshot_dir: Path, ions: list[str] | None = None) -> Iterator[RawRow]:
    """Yield one RawRow per CSV row (of the given ions, or all), CIF text attached when found."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise DataSourceError(
            f"snapshot directory not found: {snapshot_dir} (set data.snapshot_dir in params.yaml)"
        )
    rows = _read_csv(snapshot_dir / CSV_NAME)
    skip = _other_elements(set(ions)) if ions is not None else set()
    wanted = {
        r["charged_cif"].strip()
        for r in rows
        if (r.get("charged_cif") or "").strip() and r.get("working_ion") not in skip
    }
    cifs = _read_cifs(snapshot_dir, wanted)
    for row in rows:
        rel = (row.get("charged_cif") or "").strip()
        if row.get("working_ion") in skip:
            yield RawRow(fields=row)  # counted as a disabled ion by ingest, never parsed
        elif not rel:
            yield RawRow(fields=row, structure_error="charged structure missing (no charged_cif)")
        elif rel not in cifs:
            yield RawRow(fields=row, structure_error=f"charged CIF {rel} not found in the archives")
        else:
            yield RawRow(fields=row, structure_cif=cifs[rel])


@dataclass(frozen=True)
class PairRow:
    """One electrode's first voltage pair: the CSV row and both ends' CIF texts, or why not."""

    fields: dict[str, str]
    charged_cif: str | None = None
    discharged_cif: str | None = None
    error: str | None = None


def snapshot_pairs(snapshot_dir: Path, ions: list[str]) -> list[PairRow]:
    """Every row of the given ions with its charged and discharged CIF texts (the physics
    cross-check needs both ends; ingest reads the charged end only)."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise DataSourceError(
            f"snapshot directory not found: {snapshot_dir} (set data.snapshot_dir in params.yaml)"
        )
    rows = [r for r in _read_csv(snapshot_dir / CSV_NAME) if r.get("working_ion") in set(ions)]
    if rows and "discharged_cif" not in rows[0]:
        raise DataSourceError(f"{snapshot_dir / CSV_NAME} lacks the discharged_cif column")
    ends = ("charged_cif", "discharged_cif")
    wanted = {(r.get(end) or "").strip() for r in rows for end in ends} - {""}
    cifs = _read_cifs(snapshot_dir, wanted)
    return [_pair(row, cifs) for row in rows]


def _pair(row: dict[str, str], cifs: dict[str, str]) -> PairRow:
    texts: dict[str, str] = {}
    for end in ("charged_cif", "discharged_cif"):
        rel = (row.get(end) or "").strip()
        side = end.removesuffix("_cif")
        if not rel:
            return PairRow(row, error=f"{side} structure missing (no {end})")
        if rel not in cifs:
            return PairRow(row, error=f"{side} CIF {rel} not found in the archives")
        texts[end] = cifs[rel]
    return PairRow(row, **texts)


def _other_elements(wanted: set[str]) -> set[str]:
    """Real working-ion symbols that are not wanted (their CIFs need not be read)."""
    from pymatgen.core import Element

    return {e.symbol for e in Element} - wanted
