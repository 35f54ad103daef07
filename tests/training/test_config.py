"""``training/config.py``: the typed view of ``params.yaml`` (issue 18)."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from training.config import Params, UsageError, load_params

REPO = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())
#: every mapping-valued section of params.yaml (``ions`` is checked on its own)
SECTIONS = sorted(n for n, v in RAW.items() if isinstance(v, dict) and n != "ions")


def _subset(raw: Any, dumped: Any, where: str) -> None:
    """Every key of ``raw`` is in ``dumped`` with the same value, of the same type."""
    if isinstance(raw, dict):
        assert isinstance(dumped, dict), where
        for key, value in raw.items():
            assert key in dumped, f"{where}.{key}"
            _subset(value, dumped[key], f"{where}.{key}")
        return
    assert dumped == raw and type(dumped) is type(raw), where
    if isinstance(raw, list):
        assert [type(v) for v in dumped] == [type(v) for v in raw], where


def test_every_section_is_typed_and_keeps_the_files_values() -> None:
    p = load_params(REPO / "params.yaml")
    assert set(RAW) <= set(Params.model_fields)
    assert {"baselines", "model", "train", "ensemble", "transfer", "cv", "registry"} <= set(
        SECTIONS
    )
    for name in SECTIONS:
        _subset(RAW[name], getattr(p, name).model_dump(mode="json"), name)
    assert p.source_ion == RAW["source_ion"] and list(p.ions) == list(RAW["ions"])


def test_an_unknown_section_is_an_error() -> None:
    raw = {**copy.deepcopy(RAW), "trian": {"epochs": 3}}
    with pytest.raises(ValidationError, match="trian"):
        Params.model_validate(raw)


@pytest.mark.parametrize("section", SECTIONS)
def test_an_unknown_key_in_a_section_is_an_error(section: str) -> None:
    raw = copy.deepcopy(RAW)
    raw[section]["no_such_setting"] = 1
    with pytest.raises(ValidationError, match="no_such_setting"):
        Params.model_validate(raw)


@pytest.mark.parametrize("nested", ["transfer.gp", "transfer.chgnet", "transfer.scratch",
                                    "baselines.rf", "ensemble.gp"])  # fmt: skip
def test_an_unknown_nested_key_is_an_error(nested: str) -> None:
    raw = copy.deepcopy(RAW)
    section, key = nested.split(".")
    raw[section][key]["no_such_setting"] = 1
    with pytest.raises(ValidationError, match="no_such_setting"):
        Params.model_validate(raw)


def test_an_unknown_key_of_an_ion_is_an_error() -> None:
    raw = copy.deepcopy(RAW)
    raw["ions"][next(iter(raw["ions"]))]["cleen_k"] = 1.0
    with pytest.raises(ValidationError, match="cleen_k"):
        Params.model_validate(raw)


def test_a_bad_gp_setting_fails_at_load() -> None:
    raw = copy.deepcopy(RAW)
    raw["transfer"]["gp"]["nu"] = 1.0
    with pytest.raises(ValidationError, match="nu"):
        Params.model_validate(raw)


def test_defaults_are_what_the_consumers_took_for_an_absent_key() -> None:
    """An absent key means what it meant when each stage read its raw section: the runtime
    config's own default."""
    from training.baselines.models import BaselineConfig
    from training.config import (
        BaselinesSettings,
        EnsembleSettings,
        GPSettings,
        ModelSettings,
        TrainLoopSettings,
        TransferSettings,
    )
    from training.train.heads import HeadConfig
    from training.train.loop import TrainConfig
    from training.train.settings import TrainSettings, gp_config
    from voltage_model.models.cgcnn import CGCNNConfig
    from voltage_model.models.gp_head import GPConfig

    assert TrainConfig.from_dict(TrainLoopSettings().model_dump()) == TrainConfig()
    assert CGCNNConfig.from_dict(ModelSettings().model_dump()) == CGCNNConfig()
    assert gp_config(GPSettings()) == GPConfig()
    assert BaselineConfig.from_settings(BaselinesSettings(), GPSettings()) == BaselineConfig()
    assert TrainSettings.from_params(ModelSettings(), TrainLoopSettings(), EnsembleSettings()) \
        == TrainSettings.from_sections({}, {}, {})  # fmt: skip
    assert TrainSettings.from_params(ModelSettings(), TrainLoopSettings()).heads == HeadConfig()
    scratch = {
        "epochs": 100,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 1e-4,
        "scheduler": "cosine",
    }  # the dict it replaced
    assert TrainConfig.from_dict(TransferSettings().scratch.model_dump()) == TrainConfig(**scratch)
    assert GPSettings.model_validate(GPConfig(nu=1.5)) == GPSettings(nu=1.5)


def test_model_section_is_the_cgcnn_config_field_for_field() -> None:
    """``model`` is dumped straight into ``CGCNNConfig`` (the benches build models so): every
    field must exist on both sides with the same name."""
    from voltage_model.models.cgcnn import CGCNNConfig

    p = load_params(REPO / "params.yaml")
    config = CGCNNConfig(**p.model.model_dump())
    assert dataclasses.asdict(config) == p.model.model_dump() == RAW["model"] | p.model.model_dump()


def test_config_imports_neither_torch_nor_voltage_model() -> None:
    """Every stage reads it (the data stages too), and the CLI sets OpenMP's wait policy before
    torch is imported."""
    code = (
        "import sys, training.config; "
        "sys.exit(any(m == 'torch' or m.startswith('voltage_model') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_require_ion() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.require_ion(p.source_ion) is p
    with pytest.raises(UsageError, match="not enabled"):
        p.require_ion("Xx")
