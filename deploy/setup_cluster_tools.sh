#!/usr/bin/env bash
# Install the PostgreSQL server (Debian package `postgresql`) for the one-machine cluster rehearsal
# (tests/test_cluster.py, scripts/rehearse_cluster.sh). Idempotent, non-interactive, safe for CI
# running as root: does nothing when initdb and pg_ctl are already there.
#
# Why Debian's package: it is reachable from every project machine (no binary downloads) and it
# is the PostgreSQL a team runs. The rehearsal starts its own throwaway server (initdb + pg_ctl on
# a temporary folder, as the `postgres` user when run as root); the package's own cluster is never
# left running: service starts are blocked during the install (policy-rc.d), and a cluster that a
# service manager started anyway is stopped, so nothing holds port 5432.
#
# The Python side (psycopg, moto, boto3, dvc-s3) is pinned in requirements.lock and installed by
# scripts/setup.sh. Exit status 1 (with the reason) when the server cannot be installed here;
# scripts/setup.sh then says the rehearsal will skip.
set -euo pipefail

pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return 0
    fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"
    return 0
  fi
  return 1
}

check_user() {
  # initdb and postgres refuse to run as root: the rehearsal runs them as `postgres`.
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "setup_cluster_tools.sh: running as root but there is no 'postgres' user to run PostgreSQL as" >&2
    return 1
  fi
}

if bin=$(pg_bin); then
  check_user
  echo "PostgreSQL server: $bin"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_cluster_tools.sh: initdb/pg_ctl are missing and apt-get is not available;" >&2
  echo "  install the PostgreSQL server (>= 13) by other means." >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "setup_cluster_tools.sh: installing postgresql needs root (or passwordless sudo)." >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
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

if [ -z "$(apt-cache policy postgresql 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
  $SUDO apt-get update -qq
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends postgresql >"$apt_log" 2>&1; then
  echo "setup_cluster_tools.sh: apt-get install postgresql failed; last lines:" >&2
  tail -n 20 "$apt_log" >&2
  exit 1
fi

# The package creates a default cluster; make sure it is not running or starting at boot.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name _; do
    $SUDO pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
  done
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
fi

if ! bin=$(pg_bin); then
  echo "setup_cluster_tools.sh: postgresql installed but initdb/pg_ctl were not found" >&2
  exit 1
fi
check_user
echo "PostgreSQL server: $bin"
