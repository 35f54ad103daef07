"""The OpenAPI document served at ``/docs.json``: BentoML's, completed where it cannot say it.

Why a post-processing step: BentoML generates the document from the API signatures and the
pydantic models (field types, descriptions, the structure's string-or-object form: those are
fixed at the source, in :mod:`serving.service`), but it cannot express

* the service's real error answers: BentoML lists ``{error, detail}`` bodies for 400/404/500,
  while every error here is ``{"error", "kind", "status", "request_id"}`` (serving.errors), with
  400, 413, 429, 500, 503 and 504 as they occur, ``Retry-After`` on 429/503 and ``X-Request-ID``
  on every answer;
* which fields are required (``ion``; ``structure`` unless ``material_id``): the signature gives
  ``ion`` a default so a missing ion gets the service's own message, not pydantic's;
* request examples that work as sent (Swagger UI's "Try it out" otherwise sends
  ``"structure": "string"``): a real CIF, the same crystal as POSCAR and as a pymatgen object;
* the ``multipart/form-data`` upload that :mod:`serving.http_guard` accepts on ``/predict``;
* ``info.version`` (the package version, not BentoML's "None") and a description that says what
  to send.

:func:`complete` does only that, on a copy; tests/serving/test_openapi.py posts every request
example to a real server and checks each documented status and body against this document.
"""

from __future__ import annotations

import copy
from typing import Any

#: CoO2, the charged (delithiated) end of LiCoO2 (O3 stacking, 9 sites), as pymatgen writes it:
#: what a user sends for ion Li. Same text as tests/fixtures/CoO2.cif.
CIF_EXAMPLE = """\
# generated using pymatgen
data_CoO2
_symmetry_space_group_name_H-M   'P 1'
_cell_length_a   2.82000000
_cell_length_b   2.82000000
_cell_length_c   14.05000000
_cell_angle_alpha   90.00000000
_cell_angle_beta   90.00000000
_cell_angle_gamma   120.00000000
_symmetry_Int_Tables_number   1
_chemical_formula_structural   CoO2
_chemical_formula_sum   'Co3 O6'
_cell_volume   96.76207492
_cell_formula_units_Z   3
loop_
 _symmetry_equiv_pos_site_id
 _symmetry_equiv_pos_as_xyz
  1  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_symmetry_multiplicity
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Co  Co0  1  0.33333333  0.66666667  0.66666667  1
  Co  Co1  1  0.00000000  0.00000000  0.00000000  1
  Co  Co2  1  0.66666667  0.33333333  0.33333333  1
  O  O3  1  0.33333333  0.66666667  0.92666667  1
  O  O4  1  0.00000000  0.00000000  0.26000000  1
  O  O5  1  0.66666667  0.33333333  0.59333333  1
  O  O6  1  0.00000000  0.00000000  0.74000000  1
  O  O7  1  0.33333333  0.66666667  0.40666667  1
  O  O8  1  0.66666667  0.33333333  0.07333333  1
"""
POSCAR_EXAMPLE = """\
Co3 O6
1.0
   2.82   0.00000000   0.00
  -1.41   2.44219164   0.00
   0.00   0.00000000  14.05
Co O
3 6
direct
   0.33333333   0.66666667   0.66666667 Co
   0.00000000   0.00000000   0.00000000 Co
   0.66666667   0.33333333   0.33333333 Co
   0.33333333   0.66666667   0.92666667 O
   0.00000000   0.00000000   0.26000000 O
   0.66666667   0.33333333   0.59333333 O
   0.00000000   0.00000000   0.74000000 O
   0.33333333   0.66666667   0.40666667 O
   0.66666667   0.33333333   0.07333333 O
"""
_FRAC = [
    ("Co", [0.33333333, 0.66666667, 0.66666667]), ("Co", [0.0, 0.0, 0.0]),
    ("Co", [0.66666667, 0.33333333, 0.33333333]), ("O", [0.33333333, 0.66666667, 0.92666667]),
    ("O", [0.0, 0.0, 0.26]), ("O", [0.66666667, 0.33333333, 0.59333333]),
    ("O", [0.0, 0.0, 0.74]), ("O", [0.33333333, 0.66666667, 0.40666667]),
    ("O", [0.66666667, 0.33333333, 0.07333333]),
]  # fmt: skip
#: The same crystal as a pymatgen ``Structure.as_dict()`` object (the parts the service reads).
JSON_EXAMPLE = {
    "lattice": {"matrix": [[2.82, 0.0, 0.0], [-1.41, 2.44219164, 0.0], [0.0, 0.0, 14.05]]},
    "sites": [{"species": [{"element": el, "occu": 1}], "abc": abc} for el, abc in _FRAC],
}
EXAMPLE_ION = "Li"

DESCRIPTION = f"""\
Predicts the **average voltage** (V vs. the metal) of an insertion-electrode material for a
working ion (Li, Na, K, Mg, Ca, Zn, Al; `GET /models` lists what this service serves), with a
calibrated uncertainty, from the crystal structure of the material in its **charged** state (the
host with fewer working ions: CoO2 for LiCoO2, FePO4 for LiFePO4).

**What to send** to `POST /predict`: a JSON object with `ion` and `structure` (CIF text by
default; `"format": "poscar"` for POSCAR text; `"format": "json"` for a pymatgen
`Structure.as_dict()` object), or a file upload:

    curl -F file=@CoO2.cif -F ion={EXAMPLE_ION} http://127.0.0.1:3000/predict

(`format` comes from the file name: `.cif`, `.json`, `POSCAR*`/`CONTCAR*`/`.vasp`).
`POST /predict_batch` takes a JSON list of such objects and answers each in order.

**Errors** are `{{"error", "kind", "status", "request_id"}}`: `kind` names the problem (see the
service's docs/serving.md, "Errors"), `request_id` (also the `X-Request-ID` header of every
answer; send your own `X-Request-ID` to choose it) is what to quote when reporting a problem.
429 and 503 `overloaded` mean the service is busy: retry after `Retry-After` seconds.
"""

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "description": "Every error answer of the service (serving/errors.py).",
    "required": ["error", "kind", "status", "request_id"],
    "properties": {
        "error": {"type": "string", "description": "what is wrong, naming the field or limit"},
        "kind": {
            "type": "string",
            "description": "machine-readable kind: parse, format, unknown_ion, too_many_sites, "
            "too_large, unknown_element, nan_coordinates, overlapping_atoms, empty, physics, "
            "no_champion, overloaded, too_many_requests, timeout, internal",
        },
        "status": {"type": "integer", "description": "the HTTP status of the answer"},
        "request_id": {
            "type": "string",
            "description": "this request's id (also the X-Request-ID header): quote it",
        },
        "detail": {
            "description": "BentoML's validation details, when the body failed its checks",
        },
    },
}

_RID = {
    "description": "the request's id: the client's X-Request-ID when sane, else a new one",
    "schema": {"type": "string"},
}
_RETRY = {
    "description": "seconds to wait before retrying",
    "schema": {"type": "integer", "minimum": 1},
}


def _err(message: str, kind: str, status: int) -> dict[str, Any]:
    return {
        "value": {
            "error": message,
            "kind": kind,
            "status": status,
            "request_id": "3f2b8c0e9d2a4b6c8e0f1a2b3c4d5e6f",
        }
    }


#: status -> (description, {example name: (message, kind)}, retry header?)
ERRORS: dict[int, tuple[str, dict[str, tuple[str, str]], bool]] = {
    400: ("The request is wrong; sending it again unchanged fails again.", {
        "parse": ("cannot parse cif: no structure found", "parse"),
        "unknown_ion": ("unknown ion 'Xx'; this service serves Li, Na, K, Mg, Ca, Zn, Al",
                        "unknown_ion"),
        "too_many_sites": ("structure has 640 sites; the limit is 500", "too_many_sites"),
    }, False),
    413: ("The body, a structure in it or the batch is over a size limit.", {
        "too_large": ("request body is 3000000 bytes; the limit is 2097152", "too_large"),
    }, False),
    429: ("Too many requests are open at once on this service (BentoML's max_concurrency): "
          "retry after Retry-After seconds.", {
        "too_many_requests": ("too many requests open at once on this service; retry after the "
                              "delay given", "too_many_requests"),
    }, True),
    500: ("A bug; the server log has the traceback under this request_id.", {
        "internal": ("internal error (RuntimeError); see the server log", "internal"),
    }, False),
    503: ("No model for this ion (no_champion: retrying does not help until one is promoted), "
          "or the service is at capacity (overloaded: retry after Retry-After seconds).", {
        "no_champion": ("no champion model for ion Na: registered model electrode-voltage-Na "
                        "has no loadable 'champion' version", "no_champion"),
        "overloaded": ("the service is at capacity (128 structures queued per worker); retry "
                       "in 1 s", "overloaded"),
    }, True),
    504: ("Not answered within the service's timeout.", {
        "timeout": ("Not able to process the request in 60.0 seconds", "timeout"),
    }, False),
}  # fmt: skip
#: Which errors each operation can answer (413 and the 400s need a body).
OPERATION_ERRORS = {
    "/predict": (400, 413, 429, 500, 503, 504),
    "/predict_batch": (400, 413, 429, 500, 503, 504),
    "/models": (429, 500, 504),
}


def package_version() -> str:
    """The installed package's version, else the checkout's ``serving.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("electrode-voltage")
    except PackageNotFoundError:  # a Bento carries the source, not the installed package
        from serving import __version__

        return __version__


def _error_responses(statuses: tuple[int, ...]) -> dict[str, Any]:
    out = {}
    for status in statuses:
        description, examples, retry = ERRORS[status]
        headers = {"X-Request-ID": _RID}
        if retry:
            headers["Retry-After"] = _RETRY
        out[str(status)] = {
            "description": description,
            "headers": headers,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"},
                    "examples": {name: _err(m, k, status) for name, (m, k) in examples.items()},
                }
            },
        }
    return out


def _nullable(schema: dict[str, Any]) -> None:
    """OpenAPI 3.0 has no ``null`` type: a property whose default is null is ``nullable``."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]
            prop["nullable"] = True


def predict_examples() -> dict[str, Any]:
    """The ``/predict`` request examples (the first is what Swagger UI's Try it out sends)."""
    return {
        "cif": {"summary": "CoO2 (charged LiCoO2) as CIF text, ion Li",
                "value": {"ion": EXAMPLE_ION, "structure": CIF_EXAMPLE}},
        "poscar": {"summary": "the same crystal as POSCAR text",
                   "value": {"ion": EXAMPLE_ION, "format": "poscar",
                             "structure": POSCAR_EXAMPLE}},
        "json_object": {"summary": "the same crystal as a pymatgen Structure.as_dict() object",
                        "value": {"ion": EXAMPLE_ION, "format": "json",
                                  "structure": JSON_EXAMPLE}},
        "explain": {"summary": "with per-site local voltages",
                    "value": {"ion": EXAMPLE_ION, "structure": CIF_EXAMPLE, "explain": True}},
    }  # fmt: skip


def batch_examples() -> dict[str, Any]:
    return {
        "two_formats": {
            "summary": "one crystal as CIF and as POSCAR (answered in order)",
            "value": [
                {"ion": EXAMPLE_ION, "structure": CIF_EXAMPLE},
                {"ion": EXAMPLE_ION, "format": "poscar", "structure": POSCAR_EXAMPLE},
            ],
        }
    }


def _multipart() -> dict[str, Any]:
    formats = {"type": "string", "enum": ["cif", "poscar", "json"]}
    schema = {
        "type": "object",
        "title": "PredictUpload",
        "required": ["file", "ion"],
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "the structure file (CIF, POSCAR or pymatgen JSON; "
                     "format from its name: .cif, .json, POSCAR*/CONTCAR*/.vasp)"},
            "ion": {"type": "string", "description": "working ion, e.g. Li"},
            "format": {**formats, "description": "overrides the file name's format"},
            "explain": {"type": "boolean", "default": False,
                        "description": "also return per-site local voltages"},
            "discharged_file": {"type": "string", "format": "binary",
                                "description": "optional discharged end (physics_voltage)"},
            "discharged_format": {**formats, "description": "default: from the file name"},
        },
    }  # fmt: skip
    return {
        "schema": schema,
        "encoding": {"file": {"contentType": "application/octet-stream, text/plain"}},
    }


def _json_body(op: dict[str, Any]) -> dict[str, Any]:
    return op["requestBody"]["content"]["application/json"]


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """BentoML's document (``svc.openapi_spec.asdict()``) -> the one served (see module doc)."""
    doc = copy.deepcopy(spec)
    doc["info"] = {
        "title": "Electrode voltage service",
        "version": package_version(),
        "description": DESCRIPTION,
    }
    paths = doc["paths"]
    for path, statuses in OPERATION_ERRORS.items():
        op = paths[path]["post"]
        ok = op["responses"].get(200) or op["responses"].get("200")
        ok = {**ok, "headers": {"X-Request-ID": _RID}}
        op["responses"] = {"200": ok, **_error_responses(statuses)}
        op["requestBody"]["required"] = path != "/models"

    predict = paths["/predict"]["post"]
    predict["summary"] = "Voltage of one charged electrode structure"
    body = _json_body(predict)
    schema = body["schema"]
    _nullable(schema)
    schema["required"] = ["ion"]
    schema["properties"]["ion"]["example"] = EXAMPLE_ION
    schema["properties"]["structure"]["example"] = CIF_EXAMPLE
    body["examples"] = predict_examples()
    predict["requestBody"]["content"]["multipart/form-data"] = _multipart()

    batch = paths["/predict_batch"]["post"]
    batch["summary"] = "Voltages of a list of structures (ions may differ)"
    bbody = _json_body(batch)
    bbody["schema"].pop("root_input", None)  # BentoML's private marker, not OpenAPI
    _nullable(bbody["schema"]["items"])
    bbody["examples"] = batch_examples()

    paths["/models"]["post"]["summary"] = "Served model per ion (also GET /models)"

    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    # BentoML's {error, detail} bodies (not what this service answers) and its task schema (no
    # task endpoints here); its copy of /predict's input gets the same fixes as the body.
    for name in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        schemas.pop(name, None)
    if "predict__Input" in schemas:
        schemas["predict__Input"] = {**copy.deepcopy(schema), "title": "predict__Input"}
    schemas["Error"] = ERROR_SCHEMA
    return doc
