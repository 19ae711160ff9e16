#!/usr/bin/env bash
# Cost of observability: bench/load.py --scenario saturation with metrics off and on
# (and tracing on, exporting to a local OTLP sink), interleaved off/on/off/on so the
# machine's noise falls on both sides. Prints jobs/s per run and the mean of each mode.
#
#   bench/observability.sh [ROUNDS] [DURATION_S]      (defaults: 2 rounds of 10 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ROUNDS=${1:-2}
DUR=${2:-10}
OUT=$(mktemp -d)
SINK_PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$PY bench/otlp_sink.py "$SINK_PORT" & SINK=$!
trap 'kill $SINK 2>/dev/null || true; rm -rf "$OUT"' EXIT
run() {  # mode label, extra server args...
  local label=$1; shift
  local args=()
  for a in "$@"; do args+=("--server-arg=$a"); done
  $PY bench/load.py --scenario saturation --duration "$DUR" --json "$OUT/$label-$r.json" \
    "${args[@]}" >/dev/null
  $PY - "$OUT/$label-$r.json" "$label" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
runs = doc["runs"] if "runs" in doc else doc.get("results", [doc])
def find(d):
    if isinstance(d, dict):
        for k in ("jobs_per_s", "completed_per_s", "throughput"):
            if k in d and isinstance(d[k], (int, float)):
                return d[k]
        for v in d.values():
            x = find(v)
            if x is not None:
                return x
    if isinstance(d, list):
        for v in d:
            x = find(v)
            if x is not None:
                return x
    return None
print(f"{sys.argv[2]:12s} {find(doc):10.1f} jobs/s")
PYEOF
}
for r in $(seq "$ROUNDS"); do
  run metrics-off --no-metrics-enabled
  run metrics-on --metrics-addr=127.0.0.1:0
  OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" run tracing-on --metrics-addr=127.0.0.1:0
done
