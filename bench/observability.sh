#!/usr/bin/env bash
# Cost of observability: bench/load.py --scenario saturation with metrics off and on
# (and tracing on, exporting to a local OTLP sink), interleaved off/on/off/on so the
# machine's noise falls on both sides. Prints jobs/s and server CPU per job for each run
# and the means per mode; on a shared machine CPU per job is the steadier figure.
#
#   bench/observability.sh [ROUNDS] [DURATION_S]      (defaults: 2 rounds of 10 s)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's silo, whatever is installed
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
  $PY - "$OUT/$label-$r.json" "$label" "$OUT/summary.txt" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
def find(d, key):
    if isinstance(d, dict):
        if isinstance(d.get(key), (int, float)):
            return d[key]
        d = list(d.values())
    if isinstance(d, list):
        for v in d:
            x = find(v, key)
            if x is not None:
                return x
    return None
res = doc["scenarios"]["saturation"]
rate, cpu = find(res, "jobs_per_s"), find(res, "server_cpu_us_per_job")
print(f"{sys.argv[2]:12s} {rate:8.1f} jobs/s  {cpu:8.1f} us server CPU/job", flush=True)
with open(sys.argv[3], "a") as f:
    f.write(f"{sys.argv[2]} {rate} {cpu}\n")
PYEOF
}
for r in $(seq "$ROUNDS"); do
  run metrics-off --no-metrics-enabled
  run metrics-on --metrics-addr=127.0.0.1:0
  OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" run tracing-on --metrics-addr=127.0.0.1:0
done
$PY - "$OUT/summary.txt" <<'PYEOF'
import sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    mode, rate, cpu = line.split()
    runs[mode].append((float(rate), float(cpu)))
print("mode          mean jobs/s  mean us CPU/job  runs")
for mode, rs in runs.items():
    n = len(rs)
    print(f"{mode:12s} {sum(r for r, _ in rs) / n:11.1f} {sum(c for _, c in rs) / n:16.1f} {n:5d}")
PYEOF
