#!/usr/bin/env bash
# The standard benchmark suite: one command, under 10 minutes on a 2-core machine.
#
#   bench/suite.sh
#
# Runs, one after the other, each against servers it starts itself on 127.0.0.1 and
# always stops again:
#   1. bench/load.py --scenario all --baseline: enqueue, steady, drain, saturation and
#      tenants, each followed by the same scenario against bench/noop_server.py;
#   2. bench/limits.py: concurrency-limit grant latency and limited vs unlimited
#      throughput (4 tenants x per-tenant key max 100);
#   3. bench/deep_queue.py --jobs 200000: LeaseTasks latency at depth vs 1,000 queued,
#      SIGTERM and restart-to-serving time, RSS of each server process;
#   4. bench/stream.py: the streaming extension through the SDK (EnqueueMany + worker
#      stream) beside the same SDK on the unary API, 16 tenants: saturation and 500/s;
#   5. bench/h2load.py: server capacity for Enqueue and GetJob driven by h2load (Debian
#      nghttp2-client, installed with apt-get when missing), ours beside the no-op.
# Every figure comes with its placement (server CPU of each process: SO_REUSEPORT
# spreads connections, not calls, so a ratio skewed by where the kernel put the
# connections shows here) and the machine's other busy CPU.
# Then prints one summary table and writes bench/results/suite-<UTC stamp>.json (machine,
# versions, config, figures; the three full reports inside). Each step's own JSON, table
# and progress log are kept in bench/results/<UTC stamp>/. bench/results/ is git-ignored.
#
# Environment (all optional):
#   PYTHON=...        interpreter with silo installed (default: ./.venv/bin/python as
#                     made by scripts/test.sh, else python3)
#   DURATION=8        load.py measured window per scenario, seconds (warm-up 2 s)
#   DEEP_JOBS=200000  deep_queue.py depth; the issue's 1,000,000 takes about 7 minutes
#                     of pre-fill alone on 2 cores, so it is a separate command
#   SKIP=...          comma list of steps to leave out: load, limits, deep, stream, h2load
#   PEERS=1           also install (bench/peers/setup.sh: Redis, PostgreSQL, BullMQ,
#                     procrastinate) and run the peers on the same workload, printing
#                     ours/peer ratios against this run's load.py figures (~2 more min)
# Extra arguments go to load.py (e.g. --rate 800).
#
# Ctrl-C or SIGTERM stops the running step, which stops its servers, then the suite.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cd "$repo" || exit 2

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
    else PYTHON=python3; fi
fi
DURATION=${DURATION:-8}
DEEP_JOBS=${DEEP_JOBS:-200000}
SKIP=${SKIP:-}

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="$repo/bench/results/$stamp"
mkdir -p "$out" || exit 2
summary="$repo/bench/results/suite-$stamp.json"

child=
stopping=0
on_signal() {
    stopping=1
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        echo "suite: stopping the running step (pid $child)" >&2
        kill -TERM "$child" 2>/dev/null
    fi
}
trap on_signal INT TERM

# run_step NAME CMD...: run CMD in its own session (so a terminal Ctrl-C reaches only this
# script, which then sends the step exactly one SIGTERM); its stdout goes to
# $out/NAME.txt, its stderr to $out/NAME.log, both also to the terminal.
declare -A rc_of secs_of
order=()
run_step() {
    local name=$1; shift
    local t0=$SECONDS
    echo "suite: [$name] $*" >&2
    setsid "$@" > >(tee "$out/$name.txt") 2> >(tee "$out/$name.log" >&2) &
    child=$!
    local rc
    while true; do
        wait "$child"; rc=$?
        # wait returns early (>128) when a trapped signal arrives: wait again for the step
        kill -0 "$child" 2>/dev/null || break
    done
    child=
    order+=("$name")
    rc_of[$name]=$rc
    secs_of[$name]=$((SECONDS - t0))
    echo "suite: [$name] exit $rc after ${secs_of[$name]} s" >&2
}

skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

t_suite=$SECONDS
if ! skipped load && (( ! stopping )); then
    run_step load "$PYTHON" -u bench/load.py --scenario all --baseline --duration "$DURATION" \
        --warmup 2 --json "$out/load.json" "$@"
fi
if ! skipped limits && (( ! stopping )); then
    run_step limits "$PYTHON" -u bench/limits.py --json "$out/limits.json"
fi
if ! skipped deep && (( ! stopping )); then
    run_step deep "$PYTHON" -u bench/deep_queue.py --jobs "$DEEP_JOBS" --json "$out/deep_queue.json"
fi
if ! skipped stream && (( ! stopping )); then
    run_step stream "$PYTHON" -u bench/stream.py --duration "$DURATION" --json "$out/stream.json"
fi
if ! skipped h2load && (( ! stopping )); then
    run_step h2load "$PYTHON" -u bench/h2load.py --json "$out/h2load.json"
fi
if [[ "${PEERS:-0}" == 1 ]] && ! skipped load && (( ! stopping )); then
    run_step peers bash -c "bash bench/peers/setup.sh && \"$PYTHON\" -u bench/peers/run.py \
        --ours-json '$out/load.json' --json '$out/peers.json'"
fi
wall=$((SECONDS - t_suite))
trap - INT TERM

steps_json="{"
for k in "${order[@]}"; do steps_json+="\"$k\": {\"exit\": ${rc_of[$k]}, \"seconds\": ${secs_of[$k]}},"; done
steps_json="${steps_json%,}}"

"$PYTHON" - "$out" "$summary" "$wall" "$steps_json" "$stopping" <<'PY'
import json
import sys
from importlib import metadata
from pathlib import Path

out, summary, wall, steps, stopped = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "1"


def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def ver(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def g(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def num(v, unit="", nd=0):
    if v is None:
        return "n/a"
    return f"{v:,.{nd}f}{unit}"


lr, mr, dr = load("load.json"), load("limits.json"), load("deep_queue.json")
sr, hr = load("stream.json"), load("h2load.json")
first = lr or mr or dr or {}
rows = []  # (scenario, figure, ours, no-op, ratio)


def add(scn, label, ours, noop="", ratio=""):
    rows.append((scn, label, ours, noop, ratio))


other = []
if lr:
    for name, r in lr["scenarios"].items():
        b = r.get("baseline") or {}
        vs = r.get("vs_baseline") or {}
        pct = num(vs.get("rate_pct_of_noop"), " %", 0) if vs else ""
        other.append(r.get("other_cpu_cores"))
        other.append(b.get("other_cpu_cores"))
        if "fatal" in r:
            add(name, "FAILED", r["fatal"][:60])
            continue
        add(name, "placement (server cores per process)",
            " + ".join(f"{x:.2f}" for x in r.get("server_cpu_cores_by_process") or []),
            " + ".join(f"{x:.2f}" for x in b.get("server_cpu_cores_by_process") or []))
        if name == "enqueue":
            add(name, "durable enqueues/s", num(r["enqueue_per_s"]), num(b.get("enqueue_per_s")), pct)
            add(name, "Enqueue p50 / p99 ms", f"{num(g(r, 'enqueue_latency_ms', 'p50'), nd=1)} / {num(g(r, 'enqueue_latency_ms', 'p99'), nd=1)}",
                f"{num(g(b, 'enqueue_latency_ms', 'p50'), nd=1)} / {num(g(b, 'enqueue_latency_ms', 'p99'), nd=1)}")
            add(name, "server CPU / Enqueue", num(r["server_cpu_us_per_enqueue"], " µs"),
                num(b.get("server_cpu_us_per_enqueue"), " µs"), num(vs.get("server_cpu_us_over_noop"), " µs more"))
        elif name == "steady":
            lat = r["pickup_latency_ms"]
            bl = b.get("pickup_latency_ms") or {}
            add(name, f"achieved of {num(r['target_rate_per_s'])}/s", num(r["enqueue_per_s"]), num(b.get("enqueue_per_s")))
            add(name, "enqueue→received p50/p90/p99/max ms",
                " / ".join(num(lat[k], nd=1) for k in ("p50", "p90", "p99", "max")),
                " / ".join(num(bl.get(k), nd=1) for k in ("p50", "p90", "p99", "max")) if bl else "")
            add(name, "server CPU / job", num(r["server_cpu_us_per_job"], " µs"),
                num(b.get("server_cpu_us_per_job"), " µs"), num(vs.get("server_cpu_us_over_noop"), " µs more"))
        elif name == "drain":
            add(name, f"drained jobs/s ({num(r['backlog'])} backlog)", num(r["jobs_per_s"]), num(b.get("jobs_per_s")), pct)
            add(name, "server CPU / job", num(r["server_cpu_us_per_job"], " µs"),
                num(b.get("server_cpu_us_per_job"), " µs"), num(vs.get("server_cpu_us_over_noop"), " µs more"))
        else:
            label = "completed jobs/s" + (f" ({num(r['params']['routes'])} tenants)" if name == "tenants" else "")
            add(name, label, num(r["jobs_per_s"]), num(b.get("jobs_per_s")), pct)
            if name == "tenants":
                add(name, "Enqueue p99 ms", num(g(r, "enqueue_latency_ms", "p99"), nd=1),
                    num(g(b, "enqueue_latency_ms", "p99"), nd=1))
            add(name, "enqueue→report p50 / p99 ms", f"{num(g(r, 'e2e_latency_ms', 'p50'), nd=1)} / {num(g(r, 'e2e_latency_ms', 'p99'), nd=1)}",
                f"{num(g(b, 'e2e_latency_ms', 'p50'), nd=1)} / {num(g(b, 'e2e_latency_ms', 'p99'), nd=1)}")
            add(name, "server CPU / job", num(r["server_cpu_us_per_job"], " µs"),
                num(b.get("server_cpu_us_per_job"), " µs"), num(vs.get("server_cpu_us_over_noop"), " µs more"))
if mr:
    for name, r in (mr.get("scenarios") or {}).items():
        if not isinstance(r, dict):
            continue
        if "fatal" in r:
            add("limits", f"{name} FAILED", str(r["fatal"])[:60])
            continue
        # limits.py has no no-op column: its "ratio" is limited as % of unlimited
        if name == "grant-latency":
            for vname, v in (r.get("variants") or {}).items():
                lat = v.get("grant_latency_ms") or {}
                add("limits", f"release→grant p50 / p99 ms ({vname})",
                    f"{num(lat.get('p50'), nd=1)} / {num(lat.get('p99'), nd=1)}")
            other.append(g(r, "cpu", "other_cpu_cores"))
        elif name == "limited-throughput":
            s = r.get("summary") or {}
            add("limits", "jobs/s limited (4 tenants, max 100)", num(s.get("limited_jobs_per_s_mean")),
                f"unlimited {num(s.get('unlimited_jobs_per_s_mean'))}", num(s.get("limited_pct_of_unlimited"), " %"))
            for rnd in r.get("rounds") or []:
                other += [g(rnd, "limited", "cpu", "other_cpu_cores"), g(rnd, "unlimited", "cpu", "other_cpu_cores")]
if dr:
    res = dr.get("results") or {}
    if res.get("fatal"):
        add("deep queue", "FAILED", res["fatal"][:60])
    for key, label in (("probe_ref", "LeaseTasks p50 / p99 ms at 1,000"), ("probe_deep", "LeaseTasks p50 / p99 ms at depth"),
                       ("probe_restarted", "LeaseTasks p50 / p99 ms after restart")):
        p = res.get(key)
        if p:
            depth = res.get(key.replace("probe", "depth"))
            add("deep queue", label + (f" ({depth:,})" if depth and key != "probe_ref" else ""),
                f"{num(g(p, 'latency_ms', 'p50'), nd=1)} / {num(g(p, 'latency_ms', 'p99'), nd=1)}")
    fd = res.get("fill_deep")
    if fd:
        add("deep queue", "pre-fill enqueues/s (one shard)", num(fd.get("fill_per_s")))
    rs = res.get("restart") or {}
    if rs:
        add("deep queue", "SIGTERM→exit / start→ready / →first task s",
            f"{num(rs.get('stop_s'), nd=2)} / {num(rs.get('ready_s'), nd=2)} / {num(rs.get('first_task_s'), nd=2)}")
    for key, label in (("rss_deep", "RSS MB at depth (sup + workers)"), ("rss_restarted", "RSS MB after restart")):
        if res.get(key):
            add("deep queue", label, " + ".join(f"{(x['rss_kb'] or 0) / 1024:,.0f}" for x in res[key]))

if sr:
    for r in sr.get("results") or []:
        name = f"{r['scenario']} ({r['protocol']})"
        lat = r.get("enqueue_to_handler_start_ms") or {}
        add("stream", f"{name} jobs/s, {r['tenants']} tenants", num(r.get("jobs_per_s")))
        add("stream", f"{name} server CPU / job", num(r.get("server_cpu_us_per_job"), " µs"))
        add("stream", f"{name} enqueue→handler p50 / p99 ms",
            f"{num(lat.get('p50'), nd=1)} / {num(lat.get('p99'), nd=1)}")
        add("stream", f"{name} placement (cores per process)",
            " + ".join(f"{x:.2f}" for x in g(r, "cpu", "server_cores_by_process") or []))
        other.append(g(r, "cpu", "other_cpu_cores"))
if hr:
    for method in ("Enqueue", "GetJob"):
        o, n = g(hr, "silo", method) or {}, g(hr, "noop", method) or {}
        ratio = (num(100 * o["calls_per_s"] / n["calls_per_s"], " %") if o.get("calls_per_s")
                 and n.get("calls_per_s") else "")
        add("h2load", f"{method} calls/s", num(o.get("calls_per_s")), num(n.get("calls_per_s")), ratio)
        add("h2load", f"{method} server CPU / call", num(o.get("server_cpu_us_per_call"), " µs"),
            num(n.get("server_cpu_us_per_call"), " µs"))
        add("h2load", f"{method} placement (cores per process)",
            " + ".join(f"{x:.2f}" for x in g(o, "cpu", "server_cores_by_process") or []),
            " + ".join(f"{x:.2f}" for x in g(n, "cpu", "server_cores_by_process") or []))
        other += [g(o, "cpu", "other_cpu_cores"), g(n, "cpu", "other_cpu_cores")]
machine = dict(first.get("machine") or {})
machine["versions"] = {p: ver(p) for p in ("grpcio", "protobuf", "uvloop", "slatedb", "msgspec", "xxhash", "silo-server")}
other = [x for x in other if x is not None]
doc = {
    "date": first.get("date"),
    "wall_s": wall,
    "interrupted": stopped,
    "machine": machine,
    "steps": steps,
    "config": {
        "load": g(lr, "config"),
        "limits": g(mr, "config"),
        "deep_queue": g(dr, "config"),
    },
    "figures": [{"scenario": s, "figure": f, "ours": o, "noop": n, "ratio": r} for s, f, o, n, r in rows],
    "max_other_cpu_cores": max(other) if other else None,
    "reports": {"load": lr, "limits": mr, "deep_queue": dr, "stream": sr, "h2load": hr},
    "files": str(out),
}
summary.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

print()
print("=" * 100)
m = machine
print(f"Silo standard suite  {doc['date']}  commit {m.get('silo_commit')}"
      f"{' (+ local changes under silo/)' if m.get('silo_tree_dirty') else ''}")
print(f"machine: {m.get('nproc')} cpus, {m.get('cpu_model')}, kernel {m.get('kernel')}, python {m.get('python')}, "
      + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v))
if lr:
    c = lr["config"]
    print(f"load.py: {c['procs']} client procs x {c['concurrency']} in flight, {c['workers']} workers/proc,"
          f" window {c['duration_s']:g} s (+{c['warmup_s']:g} s warm-up), flush {c['flush_interval_ms']} ms,"
          f" {c['shards']} shards, {c['server_processes']} server processes")
w = [max(len(str(r[i])) for r in rows + [("scenario", "figure", "ours", "no-op", "ours/no-op")]) for i in range(5)]
hdr = ("scenario", "figure", "ours", "no-op", "ours/no-op")
print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
print("  ".join("-" * w[i] for i in range(5)))
for r in rows:
    print("  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)).rstrip())
if other:
    print(f"other load on the machine: up to {max(other):.2f} cores during a run"
          + ("  [WARNING: the machine was shared; figures are skewed]" if max(other) > 0.25 else ""))
print("steps: " + ", ".join(f"{k} {v['seconds']} s (exit {v['exit']})" for k, v in steps.items())
      + f"; suite wall time {wall // 60} min {wall % 60:02d} s")
print(f"JSON: {summary}")
print(f"step reports and logs: {out}/")
PY
rc=0
for k in "${order[@]}"; do (( rc_of[$k] != 0 )) && rc=1; done
(( stopping )) && rc=130
exit $rc
