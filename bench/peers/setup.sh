#!/usr/bin/env bash
# Install what bench/peers/ needs, from the package registries. Idempotent: a second run
# only checks. Usage: bench/peers/setup.sh   (env: VENV, PYTHON)
#
# - Debian: redis-server, postgresql (and util-linux for setpriv), via apt-get; needs
#   root or sudo, and runs `apt-get update` only when something is missing.
# - npm: bullmq + ioredis, versions pinned by node/package.json and node/package-lock.json,
#   into bench/peers/node/node_modules.
# - PyPI: procrastinate + psycopg (binary, pool) + uvloop, pinned by requirements.txt,
#   into $VENV (default bench/peers/.venv: a venv of its own, so Silo's venv and
#   bench/micro.sh's ./.venv stay as they are), created with $PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf '[peers/setup] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { say "need root (or sudo) to install: ${need[*]}"; exit 1; }
    SUDO=(sudo)
  fi
  say "apt-get install ${need[*]}"
  "${SUDO[@]}" apt-get update -q
  # On a machine with systemd the packages also start their own services (6379, 5432);
  # the bench never uses those, it starts its own servers on free loopback ports.
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
else
  say "Debian packages present: $(redis-server --version | cut -d' ' -f3),"\
" PostgreSQL $(ls /usr/lib/postgresql | sort -n | tail -1)"
fi

# --- npm: bullmq -----------------------------------------------------------
command -v node >/dev/null 2>&1 || { say "node (>= 18) is needed for bullmq; install Node.js"; exit 1; }
command -v npm >/dev/null 2>&1 || { say "npm is needed for bullmq"; exit 1; }
cd "$HERE/node"
if [ ! -f node_modules/.package-lock.json ] || [ ! -d node_modules/bullmq ] \
   || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # `npm install`, not `npm ci`: the lock file has no entries for msgpackr-extract's
  # macOS/Windows/arm prebuilds (optional; the registry reachable here answers 404 for
  # them), and `npm ci` refuses such a lock file. With the lock file present, `npm
  # install` installs exactly its versions.
  say "npm install (locked versions) in $HERE/node"
  npm install --no-audit --no-fund
else
  say "node_modules up to date (bullmq $(node -p "require('./node_modules/bullmq/package.json').version"))"
fi
cd "$HERE"

# --- PyPI: procrastinate -----------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
say "venv $VENV: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("procrastinate", m.version("procrastinate"), "psycopg", m.version("psycopg"))')"
say "done; run: python3 bench/peers/run.py --duration 10"
