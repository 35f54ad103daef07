# shellcheck shell=bash
# apt_install NAME PACKAGE...: install Debian packages non-interactively, for the optional tools
# (Prometheus, PostgreSQL, Chromium) that scripts/setup.sh offers. Sourced, not run.
#
# Returns 1 with the reason on stderr when it cannot: no apt-get, not root and no passwordless
# sudo, or the install failed (its last lines are shown). Service starts from the packages'
# maintainer scripts are blocked during the install (policy-rc.d, unless the machine already has
# one: containers often ship a deny-all policy), so no packaged daemon is left holding a port.
# Sets APT_SUDO ("" or "sudo -n") for callers that need to stop a daemon afterwards.
apt_install() {
  local name=$1
  shift
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$name: $* missing and apt-get is not available; install them by other means" >&2
    return 1
  fi
  APT_SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      APT_SUDO="sudo -n"
    else
      echo "$name: installing $* needs root (or passwordless sudo)" >&2
      return 1
    fi
  fi
  local policy=/usr/sbin/policy-rc.d added_policy=0 log status=0 pkg
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $APT_SUDO tee "$policy" >/dev/null
    $APT_SUDO chmod 755 "$policy"
    added_policy=1
  fi
  # Refresh the package lists only when one of the packages has no install candidate.
  for pkg in "$@"; do
    if [ -z "$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
      $APT_SUDO apt-get update -qq >/dev/null 2>&1 || true
      break
    fi
  done
  log=$(mktemp)
  if ! $APT_SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "$@" >"$log" 2>&1; then
    echo "$name: apt-get install $* failed; last lines:" >&2
    tail -n 20 "$log" >&2
    status=1
  fi
  rm -f "$log"
  if [ "$added_policy" = 1 ]; then
    $APT_SUDO rm -f "$policy"
  fi
  return "$status"
}
