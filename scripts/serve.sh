#!/usr/bin/env bash
# Serve every ion's champion: HTTP on 127.0.0.1:3000, gRPC on 127.0.0.1:50051 (same process).
# The service resolves models:/electrode-voltage-<Ion>@champion from the pipeline's MLflow store
# and follows the alias; an ion without a champion (or every ion, on a checkout without a
# pipeline run) is served from the pretrained release, release/. Settings are environment
# variables (docs/serving.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true
# Idle OpenMP threads sleep rather than spin (unless set already): the workers share the cores.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/work/mlflow/mlflow.db}"
export VOLTAGE_DRIFT_REFERENCE="${VOLTAGE_DRIFT_REFERENCE:-$PWD/data/drift_reference.json}"
export VOLTAGE_RECORDS="${VOLTAGE_RECORDS:-$PWD/data/clean/records.jsonl.gz}"
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$PWD/work/prometheus}"
export VOLTAGE_WORKERS="${VOLTAGE_WORKERS:-2}"  # 2 HTTP workers: the throughput optimum on 2 cores
export BENTOML_HOME="${BENTOML_HOME:-$PWD/work/bentoml}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR" "$BENTOML_HOME"
exec .venv/bin/bentoml serve serving.service:VoltageService \
  --host 127.0.0.1 --port "${VOLTAGE_HTTP_PORT:-3000}"
