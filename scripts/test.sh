#!/usr/bin/env bash
# The test command: set up, lint, run the whole suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
