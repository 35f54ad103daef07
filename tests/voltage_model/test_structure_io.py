"""User structures: every bad input is a named StructureInputError, and JSON never imports code."""

from __future__ import annotations

import json

import pytest
from pymatgen.core import Lattice, Structure

from voltage_model.structures import StructureInputError, parse_structure


def _nacl() -> Structure:
    return Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_json_site_properties_never_import_modules(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod_xyz.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "class Evil:\n    @classmethod\n    def from_dict(cls, d):\n        return cls()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _nacl().as_dict()
    data["sites"][0]["properties"] = {"p": {"@module": "evil_mod_xyz", "@class": "Evil"}}
    s = parse_structure(json.dumps(data), "json")
    assert not marker.exists()
    assert s.composition.reduced_formula == "NaCl"
    assert not s.site_properties


@pytest.mark.parametrize(
    ("text", "fmt", "kind"),
    [
        ("", "cif", "empty"),
        ("garbage", "cif", "parse"),
        ("x", "xyz", "format"),
        ("[1, 2]", "json", "parse"),
        ('{"lattice": {"matrix": [[1, 0, 0]]}, "sites": []}', "json", "parse"),
    ],
)
def test_bad_inputs_are_named(text, fmt, kind):
    with pytest.raises(StructureInputError) as err:
        parse_structure(text, fmt)
    assert err.value.kind == kind


def test_structure_checks():
    big = _nacl() * (3, 3, 3)
    with pytest.raises(StructureInputError, match="limit is 10") as err:
        parse_structure(json.dumps(big.as_dict()), "json", max_sites=10)
    assert err.value.kind == "too_many_sites"
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    with pytest.raises(StructureInputError) as err:
        parse_structure(json.dumps(close.as_dict()), "json")
    assert err.value.kind == "overlapping_atoms"
