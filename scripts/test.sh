#!/usr/bin/env bash
# Install what the tests need into ./.venv and run the linter and the whole default suite
# (unit, property and integration tests against the real server). Extra arguments go to
# pytest, e.g. scripts/test.sh -k lease   or   scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_venv dev
# The web UI browser tests drive Debian's chromium through chromium-driver (selenium).
# Installed once, only when missing; if that is impossible those tests skip with a reason.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if ! { $SUDO apt-get update -qq && \
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; \
       } >/dev/null 2>&1; then
    echo "test.sh: could not install chromium/chromium-driver; browser tests will be skipped" >&2
  fi
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
