#!/usr/bin/env bash
# Install `prometheus` and `promtool` (Debian package) where missing. Idempotent, non-interactive,
# safe for CI running as root: does nothing when both binaries are already on PATH.
#
# Why the Debian package: it is reachable from every project machine (no binary downloads), and
# it ships both the server (used by the integration test in tests/test_monitoring.py) and
# promtool (config/rule checks and rule unit tests).
#
# The package's own daemon is never left running: service starts are blocked during the install
# (policy-rc.d), and if a service manager started one anyway it is stopped and disabled, so it
# never holds 127.0.0.1:9090 or competes with the test servers.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_prometheus.sh: prometheus/promtool are missing and apt-get is not available;" >&2
  echo "  install Prometheus >= 2.42 (prometheus and promtool on PATH) by other means." >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "setup_prometheus.sh: installing prometheus needs root (or passwordless sudo)." >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive

# Block service starts from maintainer scripts unless a policy already exists (containers often
# ship one that denies everything; keep it as is).
policy=/usr/sbin/policy-rc.d
added_policy=0
apt_log=$(mktemp)
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  added_policy=1
fi
cleanup() {
  rm -f "$apt_log"
  if [ "$added_policy" = 1 ]; then
    $SUDO rm -f "$policy"
  fi
}
trap cleanup EXIT

if ! apt-cache show prometheus >/dev/null 2>&1 || [ -z "$(apt-cache policy prometheus | awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
  $SUDO apt-get update -qq
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends prometheus >"$apt_log" 2>&1; then
  echo "setup_prometheus.sh: apt-get install prometheus failed; last lines:" >&2
  tail -n 20 "$apt_log" >&2
  exit 1
fi

# If a service manager runs here, make sure the packaged daemon is neither running nor enabled.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  if command -v update-rc.d >/dev/null 2>&1; then
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "setup_prometheus.sh: the prometheus package installed but prometheus/promtool are not on PATH" >&2
  exit 1
fi
promtool --version 2>&1 | head -n 1
