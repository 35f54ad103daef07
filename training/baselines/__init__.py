"""Conventional-ML baselines: composition descriptors + mean/SVR/KRR/RF (Zhang et al. 2022)."""

from training.baselines.features import composition_features, feature_names, featurize_cached
from training.baselines.models import (
    BaselineConfig,
    BaselineResult,
    KRRParams,
    RFParams,
    SVRParams,
    rf_importance_groups,
    run_baselines,
)

__all__ = [
    "BaselineConfig",
    "BaselineResult",
    "KRRParams",
    "RFParams",
    "SVRParams",
    "composition_features",
    "feature_names",
    "featurize_cached",
    "rf_importance_groups",
    "run_baselines",
]
