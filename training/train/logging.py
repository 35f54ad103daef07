"""Logging a trained ion model to MLflow: checkpoint, pyfunc model, parity plot, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

import voltage_model
import voltage_model.pyfunc
from voltage_model.naming import CHECKPOINT_KEY

PYFUNC_REQUIREMENTS = (
    "torch==2.13.0",
    "pymatgen==2026.10.24",
    "mendeleev==1.3.0",
    "mlflow==3.17.2",
    "pandas",
    "numpy",
)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "structure"), ColSpec("string", "format")]),
        outputs=Schema([ColSpec("double", "voltage"), ColSpec("double", "uncertainty")]),
    )


def log_pyfunc(checkpoint: Path, example_cif: str) -> Any:
    """Log the checkpoint as an MLflow pyfunc (models from code); returns the ModelInfo."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(voltage_model.pyfunc.__file__)),
        artifacts={CHECKPOINT_KEY: str(checkpoint)},
        code_paths=[str(Path(voltage_model.__file__).parent)],
        signature=_signature(),
        input_example=pd.DataFrame({"structure": [example_cif], "format": ["cif"]}),
        pip_requirements=list(PYFUNC_REQUIREMENTS),
    )
