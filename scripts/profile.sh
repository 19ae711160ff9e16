#!/usr/bin/env bash
# Profile a running `silo serve` with py-spy: one speedscope file per worker process.
#
#   scripts/profile.sh [SECONDS] [OUT_DIR] [SUPERVISOR_PID]
#
# SECONDS defaults to 10, OUT_DIR to ./profiles, SUPERVISOR_PID to the `silo serve`
# process found with pgrep. Open the files at https://www.speedscope.app or with
# `py-spy`'s own viewer. Needs ptrace rights over the server (root or same user with
# ptrace_scope 0). Set PYSPY_ARGS for extra py-spy options (e.g. "--native --rate 200").
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RECORD=${1:-10}
OUT=${2:-profiles}
SUP=${3:-$(pgrep -o -f 'silo serve' || true)}
if [ -z "$SUP" ]; then echo "profile: no running 'silo serve' found" >&2; exit 2; fi
# py-spy: $PYSPY, else ./.venv/bin/py-spy, else next to the server's own python, else PATH
SERVER_BIN=$(dirname "$(readlink -f "/proc/$SUP/exe" 2>/dev/null || echo /nonexistent)")
PYSPY=${PYSPY:-$( [ -x .venv/bin/py-spy ] && echo .venv/bin/py-spy || { [ -x "$SERVER_BIN/py-spy" ] && echo "$SERVER_BIN/py-spy"; } || command -v py-spy || true)}
if [ -z "$PYSPY" ]; then
  echo "profile: py-spy not found. Install it into the server's environment with" >&2
  echo "  .venv/bin/pip install py-spy      (or: pip install py-spy / pipx install py-spy)" >&2
  echo "or capture a profile through the server instead: silo profile --duration 10 -o cpu.pprof" >&2
  exit 2
fi
WORKERS=$(cat "/proc/$SUP/task/$SUP/children" 2>/dev/null || true)
if [ -z "$WORKERS" ]; then echo "profile: supervisor $SUP has no worker processes" >&2; exit 2; fi
mkdir -p "$OUT"
stamp=$(date +%Y%m%d-%H%M%S)
pids=()
for w in $WORKERS; do
  out="$OUT/silo-$stamp-worker-$w.speedscope.json"
  # shellcheck disable=SC2086
  "$PYSPY" record --pid "$w" --duration "$SECONDS_TO_RECORD" --format speedscope \
    --output "$out" --nonblocking ${PYSPY_ARGS:-} >/dev/null 2>&1 &
  pids+=("$!")
  echo "profiling worker $w -> $out"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
