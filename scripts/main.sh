#!/usr/bin/env bash
# The main job: set up, start the service at once (every ion from the pretrained release, or from
# the registry's champions when there are some), then run the whole DVC pipeline (data -> graphs
# -> baselines -> tuning -> Li model -> per-ion transfer -> comparison -> registry) while it
# serves. The service follows the registry: when the pipeline registers and (first run) promotes
# its champions, each ion swaps to its champion without a failed request. The service keeps
# running after the pipeline (Ctrl-C stops it); VOLTAGE_MAIN_EXIT=1 stops it when the pipeline
# ends instead (scripted runs). Timestamped logs: work/logs/{serve,repro}.log.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true
# Idle OpenMP threads sleep rather than spin (unless set already): torch processes sharing a few
# cores (pipeline stages, the service's workers) otherwise slow each other down 10-25x.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p work/logs work/mlflow
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }

# 1. Serve now. One HTTP worker while the pipeline trains on the same cores (VOLTAGE_WORKERS).
VOLTAGE_WORKERS="${VOLTAGE_WORKERS:-1}" bash scripts/serve.sh > >(stamp > work/logs/serve.log) 2>&1 &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT INT TERM
port="${VOLTAGE_HTTP_PORT:-3000}"
until curl -sf "http://127.0.0.1:$port/readyz" > /dev/null; do
  if ! kill -0 "$serve_pid" 2>/dev/null; then
    echo "main: the service did not start (work/logs/serve.log)" >&2
    exit 1
  fi
  sleep 1
done
echo "main: serving on http://127.0.0.1:$port/ (web page; API reference /docs; gRPC 127.0.0.1:${VOLTAGE_GRPC_PORT:-50051}) $(( $(date +%s) - t0 )) s after start; models: curl 127.0.0.1:$port/models" >&2

# 2. Retrain everything that changed, while serving. Stage start times are in work/logs/repro.log.
t1=$(date +%s)
dvc repro 2>&1 | stamp | tee work/logs/repro.log
echo "main: dvc repro took $(( $(date +%s) - t1 )) s" | tee -a work/logs/repro.log >&2
dvc push || echo "dvc push failed (remote not reachable?): data stays in the local cache" >&2

# 3. Keep serving (the registry's champions now).
if [ "${VOLTAGE_MAIN_EXIT:-0}" = 1 ]; then
  exit 0
fi
echo "main: serving the pipeline's champions; Ctrl-C to stop" >&2
wait "$serve_pid"
