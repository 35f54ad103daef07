#!/usr/bin/env bash
# The main job: set up, run the whole DVC pipeline (data -> graphs -> baselines -> tuning -> Li
# model -> per-ion transfer -> comparison -> registry), then serve every ion's champion.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true
# Idle OpenMP threads sleep rather than spin (unless set already): torch processes sharing a few
# cores (pipeline stages, the service's workers) otherwise slow each other down 10-25x.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PATH="$PWD/.venv/bin:$PATH"
dvc repro
dvc push || echo "dvc push failed (remote not reachable?): data stays in the local cache" >&2
exec bash scripts/serve.sh
