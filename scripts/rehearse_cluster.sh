#!/usr/bin/env bash
# The one-machine rehearsal of the multi-machine setup (docs/deploy.md): PostgreSQL, an S3 server
# and `mlflow server` on 127.0.0.1, then tuning workers, the pipeline's registry path, a second
# checkout, two service replicas through a promotion, and the DVC remote on S3
# (tests/project/test_cluster.py, marker `cluster`; CI runs it with the rest of the suite).
#
#   bash scripts/rehearse_cluster.sh            # extra arguments go to pytest, e.g. -k dvc
#
# Prints each part's wall-clock seconds at the end (also in work/rehearsal/timings.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export REHEARSAL_TIMINGS="${REHEARSAL_TIMINGS:-$PWD/work/rehearsal/timings.json}"
rm -f "$REHEARSAL_TIMINGS"
status=0
.venv/bin/python -m pytest -m cluster -rs tests/project/test_cluster.py "$@" || status=$?
if [ -f "$REHEARSAL_TIMINGS" ]; then
  echo "rehearsal timings (s):"
  cat "$REHEARSAL_TIMINGS"
fi
exit "$status"
