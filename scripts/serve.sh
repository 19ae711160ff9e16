#!/usr/bin/env bash
# Install Silo into ./.venv (first run only) and start the server on the embedded default:
# 127.0.0.1:7450, jobs in SlateDB on a local directory (./silo-data). Extra arguments go
# to `silo serve` (see CONFIGURATION.md), e.g. scripts/serve.sh --shards 16 --tenancy
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/silo ] || [ pyproject.toml -nt .venv/.installed ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
  touch .venv/.installed
fi
exec .venv/bin/silo serve "$@"
