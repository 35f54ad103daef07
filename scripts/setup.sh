#!/usr/bin/env bash
# Set up (or refresh) the project's virtualenv from the pinned lock file. Idempotent and quick when
# nothing changed: the lock file's hash is remembered inside the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lock-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # The CPU build of torch (the lock's torch==...+cpu) lives on PyTorch's own index, not on PyPI.
  # It is installed first and alone with that index, so setup needs no machine-wide pip config;
  # only this one lookup goes there. Offline, or behind a mirror, pip warns that the index is
  # unreachable (2 quick retries) and takes the wheel from the machine's own pip sources.
  torch_pin=$(grep -E '^torch==' requirements.lock)
  .venv/bin/pip install -q --no-deps --retries 2 --timeout 30 \
    --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "$torch_pin"
  # Every other package, pinned exactly (torch is already satisfied: no further index lookups).
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# Prometheus + promtool (Debian package) for the monitoring tests and for operators. Optional: the
# ML stack works without them (no root or no apt here), and the tests that need them skip.
if ! bash monitoring/setup_prometheus.sh; then
  echo "setup: prometheus/promtool not installed; the monitoring tests that need them will skip" >&2
fi

# PostgreSQL server (Debian package) for the one-machine cluster rehearsal
# (tests/project/test_cluster.py, docs/deploy.md). Optional like Prometheus: without root or apt the
# rehearsal skips.
if ! bash deploy/setup_cluster_tools.sh; then
  echo "setup: PostgreSQL server not installed; the cluster rehearsal (tests/project/test_cluster.py) will skip" >&2
fi

# Chromium + chromedriver (Debian packages) for the web page's browser tests
# (tests/serving/test_web_page.py). Optional like Prometheus: without root or apt those tests skip.
# shellcheck source=lib/apt.sh
source scripts/lib/apt.sh
install_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  apt_install setup chromium chromium-driver || return 1
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}
if ! install_browser; then
  echo "setup: chromium/chromedriver not installed; the web page's browser tests will skip" >&2
fi

# The pretrained release's weights (release/*.pt) are DVC-tracked, not in git: fetch them from
# the DVC remote when it is reachable. Without them the service and CLI serve registry champions
# only (and say so); `dvc repro` + `voltage release` rebuild them.
.venv/bin/dvc pull -q release/*.pt.dvc 2>/dev/null \
  || echo "setup: release weights not pulled (DVC remote not reachable); run dvc repro + voltage release" >&2
