"""Structure format from a file name, shared by the command line and HTTP uploads.

Kept apart (no pymatgen, no typer) because both ``voltage-serve predict`` and the request guard
(``multipart/form-data`` uploads to ``/predict``) need it before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import PurePath


def guess_format(path: PurePath | str) -> str | None:
    """cif / poscar / json from the file name (POSCAR and CONTCAR have no suffix), else None."""
    p = PurePath(path)
    name, suffix = p.name.upper(), p.suffix.lower()
    if suffix == ".cif":
        return "cif"
    if suffix == ".json":
        return "json"
    if suffix in (".vasp", ".poscar") or name.startswith(("POSCAR", "CONTCAR")):
        return "poscar"
    return None
