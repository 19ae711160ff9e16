#!/usr/bin/env bash
# The fault suite: kill -9 loop of worker processes under mixed load with concurrency
# limits, a full disk on a small tmpfs (needs root to mount; skipped otherwise), floods
# of big and oversized payloads, SIGTERM under load. Each scenario takes up to ~2 min
# and prints one `CHAOS <scenario>: {...}` line of figures (jobs acked/lost, errors by
# code, recovery times, peak RSS); all of them are repeated at the end.
# Extra arguments go to pytest, e.g. scripts/chaos.sh -k kill9
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_venv dev
report=$(mktemp)
trap 'rm -f "$report"' EXIT
status=0
CHAOS_REPORT="$report" .venv/bin/python -m pytest -q -s -m slow \
  --timeout 300 tests/faults "$@" || status=$?
echo
echo "== chaos figures =="
cat "$report"
exit $status
