"""``training/config.py``: the typed view of ``params.yaml`` (issue 18)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from training.config import Params, UsageError, load_params

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())
TYPED = sorted(n for n in Params.model_fields if isinstance(RAW.get(n), dict))
#: sections still parsed by their own stage from a raw dict (``Params.section``); the next slice
#: of issue 18 types them here too.
UNTYPED = {"baselines", "cv", "ensemble", "model", "registry", "train", "transfer"}


def test_params_yaml_loads_and_every_section_is_known() -> None:
    p = load_params(REPO / "params.yaml")
    assert set(p.model_extra or {}) == UNTYPED
    assert {"data", "split", "graph", "chemsys_split", "mlflow", "tune", "interpret"} <= set(TYPED)


@pytest.mark.parametrize("section", TYPED)
def test_an_unknown_key_in_a_typed_section_is_an_error(section: str) -> None:
    raw = copy.deepcopy(RAW)
    raw[section]["no_such_setting"] = 1
    with pytest.raises(ValidationError, match="no_such_setting"):
        Params.model_validate(raw)


def test_an_unknown_key_of_an_ion_is_an_error() -> None:
    raw = copy.deepcopy(RAW)
    raw["ions"][next(iter(raw["ions"]))]["cleen_k"] = 1.0
    with pytest.raises(ValidationError, match="cleen_k"):
        Params.model_validate(raw)


def test_section_hands_out_typed_sections_as_their_dump() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.section("mlflow") == p.mlflow.model_dump() == RAW["mlflow"] | p.mlflow.model_dump()
    assert p.section("transfer") == RAW["transfer"]
    with pytest.raises(KeyError):
        p.section("no_such_section")


def test_require_ion() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.require_ion(p.source_ion) is p
    with pytest.raises(UsageError, match="not enabled"):
        p.require_ion("Xx")
