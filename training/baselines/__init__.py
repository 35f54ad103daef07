"""Conventional-ML baselines: composition descriptors + mean/SVR/KRR/RF/GP (Zhang et al. 2022),
tuned per ion by grouped inner CV (``fit_tuned``, also used by the CV check for nested CV)."""

from training.baselines.models import (
    BASELINE_METHODS,
    BaselineConfig,
    KRRParams,
    RFParams,
    SVRParams,
    rf_importance_groups,
)
from training.baselines.suite import BaselineInputs, BaselineResult, SplitRows, run_baselines
from training.baselines.tuning import (
    FittedBaseline,
    PartnerRows,
    TrainingRows,
    TuningRows,
    fit_fixed,
    fit_tuned,
)
from voltage_model.composition import composition_features, feature_names, featurize_cached

__all__ = [
    "BASELINE_METHODS",
    "BaselineConfig",
    "BaselineInputs",
    "BaselineResult",
    "FittedBaseline",
    "KRRParams",
    "PartnerRows",
    "RFParams",
    "SVRParams",
    "SplitRows",
    "TrainingRows",
    "TuningRows",
    "composition_features",
    "feature_names",
    "featurize_cached",
    "fit_fixed",
    "fit_tuned",
    "rf_importance_groups",
    "run_baselines",
]
