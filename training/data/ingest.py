"""Ingest: turn a source of MP insertion electrodes into validated, versioned records.

Two sources feed one validation path: the offline snapshot (``electrodes.csv`` + CIF tarballs) and
the live MP API (``mp_api.py``). Every candidate row is checked; bad rows are reported per ion with
the reason, never silently dropped. A missing or corrupt *source* stops the stage
(``DataSourceError``).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymatgen.core import Composition, Element, Structure

from training.data.records import Record, optional_float, write_records


class DataSourceError(RuntimeError):
    """The source itself is unusable (missing, unreadable, wrong columns): stop the stage."""


@dataclass(frozen=True)
class RawRow:
    """A candidate row as a source delivers it, before validation (values may be anything)."""

    fields: dict[str, Any]
    structure_cif: str | None = None
    structure_dict: dict[str, Any] | None = None
    structure_error: str | None = None
    source: str = "snapshot"


@dataclass(frozen=True)
class BadRow:
    battery_id: str
    working_ion: str
    reason: str


@dataclass
class IngestReport:
    source: str
    ions: list[str]
    valid: Counter = field(default_factory=Counter)
    bad: dict[str, list[BadRow]] = field(default_factory=lambda: defaultdict(list))
    skipped_ions: Counter = field(default_factory=Counter)

    def write(self, report_dir: Path) -> None:
        """One JSON report per ion (counts + every bad row with its reason) and a summary."""
        report_dir.mkdir(parents=True, exist_ok=True)
        for ion in self.ions:
            bad = self.bad.get(ion, [])
            payload = {
                "ion": ion,
                "source": self.source,
                "valid": self.valid[ion],
                "invalid": len(bad),
                "bad_rows": [{"battery_id": b.battery_id, "reason": b.reason} for b in bad],
            }
            (report_dir / f"{ion}.json").write_text(json.dumps(payload, indent=2) + "\n")
        summary = {
            "source": self.source,
            "valid": {ion: self.valid[ion] for ion in self.ions},
            "invalid": {ion: len(self.bad.get(ion, [])) for ion in self.ions},
            "skipped_other_ions": dict(sorted(self.skipped_ions.items())),
        }
        other = [b for ion, rows in self.bad.items() if ion not in self.ions for b in rows]
        summary["invalid_unknown_ion"] = [
            {"battery_id": b.battery_id, "working_ion": b.working_ion, "reason": b.reason}
            for b in other
        ]
        (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _finite_float(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not a number: {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} is not finite: {value!r}")
    return out


def _optional_int(value: Any) -> int | None:
    out = optional_float(value)
    return None if out is None else int(out)


def _parse_structure(raw: RawRow) -> Structure:
    if raw.structure_error:
        raise ValueError(raw.structure_error)
    if raw.structure_dict is not None:
        return Structure.from_dict(raw.structure_dict)
    if raw.structure_cif is None:
        raise ValueError("charged structure missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            structure = Structure.from_str(raw.structure_cif, fmt="cif")
        except Exception as exc:  # pymatgen raises many types for malformed CIFs
            raise ValueError(f"charged CIF does not parse: {str(exc)[:200]}") from None
    return structure


def _check_structure(structure: Structure, formula: str) -> None:
    if len(structure) == 0:
        raise ValueError("charged structure has no sites")
    if not structure.is_ordered:
        raise ValueError("charged structure is disordered (partial occupancies)")
    try:
        expected = Composition(formula).reduced_composition
    except Exception:
        raise ValueError(f"charged_formula does not parse: {formula!r}") from None
    got = structure.composition.reduced_composition
    if not got.almost_equals(expected, rtol=1e-3):
        raise ValueError(
            f"formula mismatch: charged_formula {formula} but structure is {got.reduced_formula}"
        )


def validate_row(raw: RawRow, ions: frozenset[str]) -> Record | BadRow:
    """Check one row; return a Record, or a BadRow naming the first problem found."""
    f = raw.fields
    battery_id = str(f.get("battery_id") or "").strip()
    ion = str(f.get("working_ion") or "").strip()
    try:
        if not battery_id:
            raise ValueError("battery_id missing")
        if ion not in ions:
            raise ValueError(f"unknown working ion {ion!r}")
        voltage = _finite_float(f.get("battery_avg_voltage"), "battery_avg_voltage")
        pair = f.get("pair_voltage")
        pair_voltage = None if pair in (None, "") else _finite_float(pair, "pair_voltage")
        charged_formula = str(f.get("charged_formula") or "").strip()
        structure = _parse_structure(raw)
        _check_structure(structure, charged_formula)
        flag = f.get("in_npj2022_clean_set")
        return Record(
            battery_id=battery_id,
            working_ion=ion,
            charged_id=str(f.get("charged_id") or "").strip(),
            charged_formula=charged_formula,
            discharged_id=str(f.get("discharged_id") or "").strip(),
            discharged_formula=str(f.get("discharged_formula") or "").strip(),
            battery_avg_voltage=voltage,
            pair_voltage=pair_voltage,
            charged_spacegroup=_optional_int(f.get("charged_spacegroup_number")),
            charged_nsites=len(structure),
            charged_structure=structure.as_dict(),
            source=raw.source,
            capacity_grav=optional_float(f.get("capacity_grav")),
            capacity_vol=optional_float(f.get("capacity_vol")),
            energy_grav=optional_float(f.get("energy_grav")),
            energy_vol=optional_float(f.get("energy_vol")),
            max_delta_volume=optional_float(f.get("max_delta_volume")),
            in_npj2022_clean_set=None if flag in (None, "") else bool(int(float(flag))),
        )
    except ValueError as exc:
        return BadRow(battery_id=battery_id or "<missing>", working_ion=ion, reason=str(exc))


def _validate_star(args: tuple[RawRow, frozenset[str]]) -> Record | BadRow:
    return validate_row(*args)


def ingest(
    rows: Iterable[RawRow],
    ions: list[str],
    out: Path,
    report_dir: Path,
    source: str,
    workers: int = 1,
) -> IngestReport:
    """Validate every row (in parallel: CIF parsing dominates) and write records + reports."""
    report = IngestReport(source=source, ions=list(ions))
    wanted = frozenset(ions)

    def enabled(rows: Iterable[RawRow]) -> Iterator[tuple[RawRow, frozenset[str]]]:
        for raw in rows:
            ion = str(raw.fields.get("working_ion") or "").strip()
            if ion not in wanted and Element.is_valid_symbol(ion):
                report.skipped_ions[ion] += 1  # a real ion the params do not enable
                continue
            yield raw, wanted

    records: list[Record] = []
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap(_validate_star, enabled(rows), chunksize=32))
    else:
        results = [validate_row(raw, w) for raw, w in enabled(rows)]
    for res in results:
        if isinstance(res, Record):
            records.append(res)
            report.valid[res.working_ion] += 1
        else:
            report.bad[res.working_ion].append(res)
    records.sort(key=lambda r: (r.working_ion, r.battery_id))
    write_records(out, records)
    report.write(report_dir)
    return report
