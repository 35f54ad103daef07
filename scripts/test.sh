#!/usr/bin/env bash
# The test command: set up, lint, run the whole suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true
# Idle OpenMP threads sleep rather than spin (unless set already): the tests start servers and
# stages that run torch side by side, which spinning threads slow down 10-25x.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
