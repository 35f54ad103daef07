#!/usr/bin/env bash
# Install the PostgreSQL server (Debian package `postgresql`) for the one-machine cluster rehearsal
# (tests/project/test_cluster.py, scripts/rehearse_cluster.sh). Idempotent, non-interactive, safe
# for CI running as root: does nothing when initdb and pg_ctl are already there.
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

# shellcheck source=../scripts/lib/apt.sh
source "$(dirname "$0")/../scripts/lib/apt.sh"
apt_install setup_cluster_tools.sh postgresql

# The package creates a default cluster; make sure it is not running or starting at boot.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name _; do
    $APT_SUDO pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
  done
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $APT_SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
fi

if ! bin=$(pg_bin); then
  echo "setup_cluster_tools.sh: postgresql installed but initdb/pg_ctl were not found" >&2
  exit 1
fi
check_user
echo "PostgreSQL server: $bin"
