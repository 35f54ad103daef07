"""The MLflow pyfunc around a self-describing checkpoint ("models from code").

``mlflow.pytorch.log_model`` would torch.export a fixed-shape graph, useless for crystals of any
size; this pyfunc instead loads the weights-only checkpoint artifact and predicts through
``voltage_model.predict``. Input: a DataFrame with ``structure`` (text) and ``format``
(``cif``/``poscar``/``json``) columns; output: ``voltage`` and ``uncertainty`` in volts.
This file is what ``log_model(python_model=...)`` records, so it must stay import-light; the
logged model carries the ``voltage_model`` package as its code, and its pip requirements are
derived from what this package imports (``training/train/pyfunc.py``).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class VoltagePyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from voltage_model.naming import CHECKPOINT_KEY
        from voltage_model.predict import VoltageModel

        self.model = VoltageModel.from_checkpoint(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        from voltage_model.structures import parse_structure

        fmts = model_input["format"] if "format" in model_input else ["cif"] * len(model_input)
        structures = [
            parse_structure(text, fmt)
            for text, fmt in zip(model_input["structure"], fmts, strict=True)
        ]
        preds = self.model.predict(structures)
        return pd.DataFrame(
            {
                "voltage": [p.voltage for p in preds],
                "uncertainty": [p.uncertainty for p in preds],
            }
        )


mlflow.models.set_model(VoltagePyfunc())
