#!/usr/bin/env bash
# Install Silo into ./.venv (first run only) and start the server on the embedded default:
# 127.0.0.1:7450, jobs in SlateDB on a local directory (./silo-data). Extra arguments go
# to `silo serve` (see CONFIGURATION.md), e.g. scripts/serve.sh --shards 16 --tenancy
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_venv
exec .venv/bin/silo serve "$@"
