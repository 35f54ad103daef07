"""Source 2 (live): insertion electrodes for the configured ions through ``mp-api``.

Only the network layer lives here; the rows it yields go through the same validation as the
snapshot's. ``client`` is an ``mp_api.client.MPRester`` (or anything with the same two search
endpoints: tests use a recorded fake). The charged structure is fetched by ``id_charge`` from the
summary endpoint because the electrode document carries only the ion-free framework.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from training.data.ingest import DataSourceError, RawRow

ELECTRODE_FIELDS = [
    "battery_id",
    "working_ion",
    "id_charge",
    "id_discharge",
    "formula_charge",
    "formula_discharge",
    "average_voltage",
    "adj_pairs",
    "capacity_grav",
    "capacity_vol",
    "energy_grav",
    "energy_vol",
    "max_delta_volume",
]
SUMMARY_FIELDS = ["material_id", "structure", "symmetry"]


def _get(obj: Any, key: str) -> Any:
    """Read a field from an mp-api document (pydantic model) or a plain dict alike."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_dict(structure: Any) -> dict[str, Any] | None:
    if structure is None:
        return None
    return structure if isinstance(structure, dict) else structure.as_dict()


def _pair_voltage(doc: Any) -> float | None:
    pairs = _get(doc, "adj_pairs") or []
    return _get(pairs[0], "average_voltage") if pairs else None


def _spacegroup(summary: Any) -> int | None:
    sym = _get(summary, "symmetry") if summary is not None else None
    return _get(sym, "number") if sym is not None else None


def _to_fields(doc: Any, summary: Any) -> dict[str, Any]:
    """Map an InsertionElectrodeDoc (+ the charged material's summary) onto snapshot columns."""
    return {
        "battery_id": str(_get(doc, "battery_id")),
        "working_ion": str(_get(doc, "working_ion")),
        "charged_id": str(_get(doc, "id_charge")),
        "charged_formula": _get(doc, "formula_charge"),
        "discharged_id": str(_get(doc, "id_discharge")),
        "discharged_formula": _get(doc, "formula_discharge"),
        "battery_avg_voltage": _get(doc, "average_voltage"),
        "pair_voltage": _pair_voltage(doc),
        "charged_spacegroup_number": _spacegroup(summary),
        "capacity_grav": _get(doc, "capacity_grav"),
        "capacity_vol": _get(doc, "capacity_vol"),
        "energy_grav": _get(doc, "energy_grav"),
        "energy_vol": _get(doc, "energy_vol"),
        "max_delta_volume": _get(doc, "max_delta_volume"),
    }


def mp_api_rows(client: Any, ions: list[str]) -> Iterator[RawRow]:
    """Yield RawRows for every insertion electrode of the given working ions."""
    for ion in ions:
        try:
            docs = list(
                client.materials.insertion_electrodes.search(
                    working_ion=ion, fields=ELECTRODE_FIELDS
                )
            )
            ids = sorted({str(_get(d, "id_charge")) for d in docs if _get(d, "id_charge")})
            summaries = (
                client.materials.summary.search(material_ids=ids, fields=SUMMARY_FIELDS)
                if ids
                else []
            )
        except Exception as exc:  # the client raises its own error types for network failures
            raise DataSourceError(f"MP API query for {ion} failed: {exc}") from exc
        by_id = {str(_get(s, "material_id")): s for s in summaries}
        for doc in docs:
            summary = by_id.get(str(_get(doc, "id_charge")))
            structure = _as_dict(_get(summary, "structure")) if summary is not None else None
            yield RawRow(
                fields=_to_fields(doc, summary),
                structure_dict=structure,
                structure_error=None if structure else "charged structure not returned by MP API",
                source="mp_api",
            )


def live_client() -> Any:
    """An MPRester for ``MP_API_KEY``; imported lazily so offline use never needs the network."""
    key = os.environ.get("MP_API_KEY")
    if not key:
        raise DataSourceError("MP_API_KEY is not set")
    from mp_api.client import MPRester

    return MPRester(key)
