#!/usr/bin/env bash
# Install what the tests need into ./.venv and run the linter and the whole default suite
# (unit, property and integration tests against the real server). Extra arguments go to
# pytest, e.g. scripts/test.sh -k lease   or   scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/pytest ] || [ pyproject.toml -nt .venv/.installed-dev ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  touch .venv/.installed-dev
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
