#!/usr/bin/env bash
# Sets up everything `make demo`, `make test` and `make bench` need on a fresh Debian/Ubuntu machine:
# a virtual environment with the package, its dev tools and the first-party plugins, and redis-server.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed

say() { printf '==> %s\n' "$*"; }
is_root() { [ "$(id -u)" -eq 0 ]; }

apt_install() {
  if is_root && command -v apt-get >/dev/null 2>&1; then
    say "installing $* from the OS packages"
    if [ -z "${APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    return 0
  fi
  return 1
}

# 1. Python >= 3.10 with venv support.
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; install Python 3.10 or newer (e.g. apt-get install python3)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: Python 3.10 or newer is needed; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment in $VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3-venv || {
      echo "error: '$PYTHON -m venv' failed; install the venv module (apt-get install python3-venv)" >&2
      exit 1
    }
    "$PYTHON" -m venv "$VENV"
  fi
fi

# 2. The package, its extras for development, benchmarks and speed (hiredis, uvloop: what
#    `pip install 'resilient-cache[fast]'` adds), and the first-party plugins (plugins/*: real
#    distributions found through their entry points, as a user's would be).
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ plugins/slowlog/pyproject.toml -nt "$STAMP" ] \
   || [ plugins/chaos/pyproject.toml -nt "$STAMP" ] || [ plugins/dualwrite/pyproject.toml -nt "$STAMP" ]; then
  say "installing resilient-cache and its first-party plugins into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev,bench,fast]' -e plugins/slowlog -e plugins/chaos \
    -e plugins/dualwrite
  touch "$STAMP"
fi

# 3. redis-server for the throwaway local cluster.
if [ -n "${REDIS_SERVER_BIN:-}" ]; then
  [ -x "$REDIS_SERVER_BIN" ] || { echo "error: REDIS_SERVER_BIN=$REDIS_SERVER_BIN is not executable" >&2; exit 1; }
elif ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server || {
    echo "error: redis-server is not installed. Install it (as root: apt-get install redis-server;" >&2
    echo "       macOS: brew install redis) or set REDIS_SERVER_BIN=/path/to/redis-server." >&2
    exit 1
  }
  # The Debian package starts a system-wide server on 6379; the project does not need it.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server >/dev/null 2>&1 || true; fi
fi
say "ready: $("$VENV/bin/python" -V), $(${REDIS_SERVER_BIN:-redis-server} --version | cut -d' ' -f1-3)"
