#!/usr/bin/env bash
# Install `prometheus` and `promtool` (Debian package) where missing. Idempotent, non-interactive,
# safe for CI running as root: does nothing when both binaries are already on PATH.
#
# Why the Debian package: it is reachable from every project machine (no binary downloads), and
# it ships both the server (used by the integration test in tests/project/test_monitoring.py) and
# promtool (config/rule checks and rule unit tests).
#
# The package's own daemon is never left running: service starts are blocked during the install
# (policy-rc.d), and if a service manager started one anyway it is stopped and disabled, so it
# never holds 127.0.0.1:9090 or competes with the test servers.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi

# shellcheck source=../scripts/lib/apt.sh
source "$(dirname "$0")/../scripts/lib/apt.sh"
apt_install setup_prometheus.sh prometheus

# If a service manager runs here, make sure the packaged daemon is neither running nor enabled.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $APT_SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  $APT_SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  if command -v update-rc.d >/dev/null 2>&1; then
    $APT_SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "setup_prometheus.sh: the prometheus package installed but prometheus/promtool are not on PATH" >&2
  exit 1
fi
promtool --version 2>&1 | head -n 1
