"""bench/load.py's results: per-scenario summaries from the client processes' records,
the comparison with the no-op baseline, and the printed report."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Any

from common import (
    OTHER_LOAD_WARN_CORES,
    ServerProc,
    percentiles_ms,
)
from load_client import TARGETS


def summarize(name: str, mode: str, args: argparse.Namespace, results: dict[int, dict[str, Any]],
              missing: list[int], s0: dict[str, Any], s1: dict[str, Any],
              progress: list[dict[str, Any]], server: ServerProc | None,
              extra: dict[str, Any]) -> dict[str, Any]:
    window = max(1e-9, s1["t"] - s0["t"])
    errors: Counter[str] = Counter()
    msgs: Counter[str] = Counter()
    fatal = {}
    agg: dict[str, Any] = Counter()
    lat_keys = ("enq_lat_us", "e2e_lat_us", "pickup_lat_us", "report_lat_us", "lease_lat_us",
                "send_lag_us")
    lats: dict[str, list[float]] = {k: [] for k in lat_keys}
    last_done: list[float] = []
    for slot, r in results.items():
        if "fatal" in r:
            fatal[slot] = r["fatal"]
            continue
        errors.update(r["errors"])
        msgs.update(r["error_msgs"])
        for k in ("enq_ok", "enq_ok_win", "done_ok", "done_ok_win", "stale_done_win", "lease_calls",
                  "lease_calls_win", "lease_empty", "lease_empty_win", "leased_tasks",
                  "leased_tasks_win", "sends_skipped", "fill_ok"):
            agg[k] += r[k]
        for k in lat_keys:
            lats[k] += r[k]
        if r["last_done_t"] is not None:
            last_done.append(r["last_done_t"])
    srv_cpu = (s1["server"] - s0["server"]) if (s0["server"] is not None and s1["server"] is not None) else None
    # per server process (supervisor and workers): how evenly the load spread
    by_proc = sorted(((c - s0["server_by_pid"].get(p, 0.0)) / window
                      for p, c in s1["server_by_pid"].items()), reverse=True)
    cli_cpu = s1["clients"] - s0["clients"]
    mb = (s1["machine"][0] - s0["machine"][0]) / max(1.0, s1["machine"][1] - s0["machine"][1])

    def per(cpu: float | None, n: int) -> float | None:
        return round(cpu * 1e6 / n, 1) if (cpu is not None and n) else None

    out: dict[str, Any] = {
        "params": {"mode": mode, "tenants": args.tenants, "routes": extra["routes"],
                   "shards_used": extra["shards_used"]},
        "window_s": round(window, 3),
        "errors": dict(errors),
        "error_total": sum(errors.values()),
        "error_messages": dict(msgs),
        "client_fatal": fatal,
        "clients_missing": missing,
        "server_cpu_s": None if srv_cpu is None else round(srv_cpu, 3),
        "server_cpu_cores": None if srv_cpu is None else round(srv_cpu / window, 3),
        "server_cpu_cores_by_process": [round(x, 2) for x in by_proc if x >= 0.005],
        "loadgen_cpu_s": round(cli_cpu, 3),
        "loadgen_cpu_cores": round(cli_cpu / window, 3),
        "machine_busy_pct": round(100 * mb, 1),
        # busy cores not used by the server or the load generator: other processes (or
        # kernel work nobody is billed for). Much above ~0.1 means the figures are skewed.
        "other_cpu_cores": (None if srv_cpu is None else
                            round(mb * (os.cpu_count() or 1) - (srv_cpu + cli_cpu) / window, 2)),
        "progress": progress,
    }
    if mode in ("enqueue", "fill"):
        n = agg["enq_ok_win"] if mode == "enqueue" else agg["enq_ok"]
        out.update({
            "enqueues": n, "enqueues_total": agg["enq_ok"],
            "enqueue_per_s": round(n / window, 1),
            "enqueue_latency_ms": percentiles_ms(lats["enq_lat_us"]),
            "server_cpu_us_per_enqueue": per(srv_cpu, n),
            "loadgen_cpu_us_per_enqueue": per(cli_cpu, n),
        })
        if mode == "fill":
            out["params"]["backlog"] = args.backlog
            out.update({k: extra.get(k) for k in ("fill_complete", "filled", "fill_s", "fill_per_s")})
        return finish(out, server)
    calls = agg["lease_calls_win"]
    out.update({
        "lease_calls": calls, "lease_calls_per_s": round(calls / window, 1),
        "lease_empty_pct": round(100 * agg["lease_empty_win"] / calls, 1) if calls else None,
        "tasks_per_lease": round(agg["leased_tasks_win"] / calls, 2) if calls else None,
        "lease_latency_ms": percentiles_ms(lats["lease_lat_us"]),
        "report_latency_ms": percentiles_ms(lats["report_lat_us"]),
    })
    if mode == "drain":
        d0 = extra.get("drain_start")
        drained = agg["done_ok"]
        drain_s = (max(last_done) - d0) if (d0 is not None and last_done) else None
        out["params"]["backlog"] = args.backlog
        out.update({
            "backlog": agg["fill_ok"],
            "fill_s": extra.get("fill_s"), "fill_per_s": extra.get("fill_per_s"),
            "drained": drained, "remaining": agg["fill_ok"] - drained,
            "drain_s": None if drain_s is None else round(drain_s, 3),
            "jobs_per_s": round(drained / drain_s, 1) if drain_s else None,
            "completed_from_other_runs": agg["stale_done_win"],
            "server_cpu_us_per_job": per(srv_cpu, drained),
            "loadgen_cpu_us_per_job": per(cli_cpu, drained),
        })
        return finish(out, server)
    n = agg["done_ok_win"]
    out.update({
        "completed": n, "completed_total": agg["done_ok"],
        "completed_from_other_runs": agg["stale_done_win"],
        "jobs_per_s": round(n / window, 1),
        "enqueues": agg["enq_ok_win"], "enqueue_per_s": round(agg["enq_ok_win"] / window, 1),
        "backlog_at_end": agg["enq_ok"] - agg["done_ok"],
        "pickup_latency_ms": percentiles_ms(lats["pickup_lat_us"]),
        "e2e_latency_ms": percentiles_ms(lats["e2e_lat_us"]),
        "enqueue_latency_ms": percentiles_ms(lats["enq_lat_us"]),
        "server_cpu_us_per_job": per(srv_cpu, n),
        "loadgen_cpu_us_per_job": per(cli_cpu, n),
    })
    if mode == "steady":
        out["params"]["rate"] = args.rate
        out.update({
            "target_rate_per_s": args.rate,
            "send_lag_ms": percentiles_ms(lats["send_lag_us"]),
            "sends_skipped": agg["sends_skipped"],
        })
    return finish(out, server)


def finish(out: dict[str, Any], server: ServerProc | None) -> dict[str, Any]:
    if server is not None:
        out["server_alive_after"] = server.alive()
    return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:,.1f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def lat_str(d: dict[str, Any] | None, keys: tuple[str, ...] = ("p50", "p90", "p99", "max")) -> str:
    if not d:
        return "n/a"
    return "  ".join(f"{k} {fmt(d[k])}" for k in keys) + "  ms"


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return ""
    ok = value >= target if higher_is_better else value <= target
    rel = "≥" if higher_is_better else "≤"
    return f"[target {rel} {target:,.0f}: {'met' if ok else 'MISSED'}]"


# Figures compared with the no-op baseline, per scenario: (rate key, server CPU per op key,
# label of the rate, what one op is).
BASELINE_KEYS = {
    "enqueue": ("enqueue_per_s", "server_cpu_us_per_enqueue", "durable enqueues/s", "Enqueue"),
    "steady": ("jobs_per_s", "server_cpu_us_per_job", "completed jobs/s at the fixed rate", "job"),
    "drain": ("jobs_per_s", "server_cpu_us_per_job", "drained jobs/s", "job"),
    "saturation": ("jobs_per_s", "server_cpu_us_per_job", "completed jobs/s", "job"),
    "tenants": ("jobs_per_s", "server_cpu_us_per_job", "completed jobs/s", "job"),
}


def compare_baseline(name: str, ours: dict[str, Any], noop: dict[str, Any]) -> dict[str, Any]:
    """Ours relative to the no-op server: rate as % of its rate, server CPU per op above its."""
    rate_key, cpu_key, _, _ = BASELINE_KEYS[name]
    out: dict[str, Any] = {"rate_figure": rate_key, "server_cpu_figure": cpu_key,
                           "rate_pct_of_noop": None, "server_cpu_us_over_noop": None,
                           "loadgen_cpu_us_over_noop": None}
    if "fatal" in ours or "fatal" in noop:
        return out
    if noop.get(rate_key) and ours.get(rate_key) is not None:
        out["rate_pct_of_noop"] = round(100.0 * ours[rate_key] / noop[rate_key], 1)
    a, b = ours.get(cpu_key), noop.get(cpu_key)
    if a is not None and b is not None:
        out["server_cpu_us_over_noop"] = round(a - b, 1)
    lg_key = cpu_key.replace("server_", "loadgen_")
    a, b = ours.get(lg_key), noop.get(lg_key)
    if a is not None and b is not None:
        out["loadgen_cpu_us_over_noop"] = round(a - b, 1)
    if name == "steady":
        a = (ours.get("pickup_latency_ms") or {}).get("p99")
        b = (noop.get("pickup_latency_ms") or {}).get("p99")
        if a is not None and b is not None:
            out["pickup_p99_ms_over_noop"] = round(a - b, 3)
    return out


def worker_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("LeaseTasks latency", lat_str(r["lease_latency_ms"], ("p50", "p99")), ""),
        ("ReportOutcome latency", lat_str(r["report_latency_ms"], ("p50", "p99")), ""),
        ("LeaseTasks calls/s", f"{fmt(r['lease_calls_per_s'])}  ({fmt(r['lease_empty_pct'])}% empty,"
         f" {fmt(r['tasks_per_lease'])} tasks/call)", ""),
    ]


def scenario_rows(name: str, r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, value, verdict) rows of one scenario's result."""
    rows: list[tuple[str, str, str]] = []
    if "fatal" in r:
        rows.append(("FAILED", r["fatal"], ""))
    elif name == "enqueue":
        rows += [
            ("durable enqueues/s", fmt(r["enqueue_per_s"]),
             verdict(r["enqueue_per_s"], TARGETS["enqueue_per_s"], True)),
            ("enqueues in window", fmt(r["enqueues"]), ""),
            ("Enqueue latency", lat_str(r["enqueue_latency_ms"]), ""),
            ("server CPU / Enqueue", fmt(r["server_cpu_us_per_enqueue"], " µs"),
             verdict(r["server_cpu_us_per_enqueue"], TARGETS["server_cpu_us_per_enqueue"], False)),
            ("loadgen CPU / Enqueue", fmt(r["loadgen_cpu_us_per_enqueue"], " µs"), ""),
        ]
    elif name == "steady":
        rows += [
            ("target rate", fmt(r["target_rate_per_s"], " enqueues/s"), ""),
            ("achieved enqueues/s", fmt(r["enqueue_per_s"]), ""),
            ("completed jobs/s", fmt(r["jobs_per_s"]), ""),
            ("enqueue→received", lat_str(r["pickup_latency_ms"]), ""),
            ("enqueue→report", lat_str(r["e2e_latency_ms"], ("p50", "p99", "max")), ""),
            ("Enqueue latency", lat_str(r["enqueue_latency_ms"], ("p50", "p99")), ""),
            *worker_rows(r),
            ("send lag", lat_str(r["send_lag_ms"], ("p50", "p99", "max"))
             + (f"  ({r['sends_skipped']:,} sends skipped)" if r["sends_skipped"] else ""), ""),
            ("backlog at end", fmt(r["backlog_at_end"]), ""),
            ("server CPU / job", fmt(r["server_cpu_us_per_job"], " µs"), ""),
            ("loadgen CPU / job", fmt(r["loadgen_cpu_us_per_job"], " µs"), ""),
        ]
    elif name == "drain":
        rows += [
            ("drained jobs/s", fmt(r["jobs_per_s"]), ""),
            ("backlog drained", f"{fmt(r['drained'])} of {fmt(r['backlog'])} in {fmt(r['drain_s'], ' s')}"
             + (f"  ({r['remaining']:,} LEFT)" if r["remaining"] else ""), ""),
            ("pre-fill (not timed)", f"{fmt(r['fill_s'], ' s')}, {fmt(r['fill_per_s'])} enqueues/s", ""),
            *worker_rows(r),
            ("server CPU / job", fmt(r["server_cpu_us_per_job"], " µs"), ""),
            ("loadgen CPU / job", fmt(r["loadgen_cpu_us_per_job"], " µs"), ""),
        ]
    else:  # saturation, tenants
        rows += [
            ("completed jobs/s", fmt(r["jobs_per_s"]),
             verdict(r["jobs_per_s"], TARGETS["e2e_jobs_per_s"], True) if name == "saturation" else ""),
        ]
        if name == "tenants":
            rows.append(("tenants", f"{fmt(r['params']['routes'])} over"
                         f" {fmt(r['params']['shards_used'])} shard(s), round-robin", ""))
        rows += [
            ("completed in window", fmt(r["completed"]), ""),
            ("enqueues/s", fmt(r["enqueue_per_s"]), ""),
            ("backlog at end", fmt(r["backlog_at_end"]), ""),
            ("enqueue→report", lat_str(r["e2e_latency_ms"], ("p50", "p99", "max")), ""),
            ("Enqueue latency", lat_str(r["enqueue_latency_ms"], ("p50", "p99")), ""),
            *worker_rows(r),
            ("server CPU / job", fmt(r["server_cpu_us_per_job"], " µs"),
             verdict(r["server_cpu_us_per_job"], TARGETS["server_cpu_us_per_job"], False)
             if name == "saturation" else ""),
            ("loadgen CPU / job", fmt(r["loadgen_cpu_us_per_job"], " µs"), ""),
        ]
    if "fatal" not in r:
        rows += [
            ("server CPU", fmt(r["server_cpu_cores"], " cores"), ""),
            ("  by process", " + ".join(f"{x:.2f}" for x in r.get("server_cpu_cores_by_process") or [])
             or "n/a", ""),
            ("loadgen CPU", fmt(r["loadgen_cpu_cores"], " cores"), ""),
            ("machine busy", fmt(r["machine_busy_pct"], " %"), ""),
            ("other busy CPU", fmt(r.get("other_cpu_cores"), " cores"),
             "[WARNING: other load on the machine]"
             if (r.get("other_cpu_cores") or 0) > OTHER_LOAD_WARN_CORES else ""),
            ("errors", "none" if not r["error_total"] else
             ", ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())), ""),
        ]
        if r.get("completed_from_other_runs"):
            rows.append(("note", f"{r['completed_from_other_runs']:,} of the completed jobs were"
                         " enqueued before this run (no latency for them)", ""))
        if r["client_fatal"] or r["clients_missing"]:
            rows.append(("client failures",
                         f"fatal={r['client_fatal']} missing={r['clients_missing']}", ""))
        if r.get("server_alive_after") is False:
            rows.append(("SERVER", "exited during the run", ""))
    if r.get("server_exit_code") not in (0, None):
        rows.append(("server exit code",
                     f"{r['server_exit_code']} (negative = killed by signal)", ""))
    return rows


def print_details(r: dict[str, Any], who: str = "") -> None:
    """Distinct error messages and the server's stderr tail, if any."""
    for msg, n in (r.get("error_messages") or {}).items():
        print(f"    {who}{n:>7,}  {msg}")
    if r.get("server_stderr_tail"):
        print(f"  {who}server stderr tail:")
        for line in r["server_stderr_tail"].splitlines():
            print(f"    | {line}")


def print_report(report: dict[str, Any]) -> None:
    m, c = report["machine"], report["config"]
    print()
    print(f"machine: {m['nproc']} cpus, {m['cpu_model']}, python {m['python']}, grpcio {m['grpcio']}"
          f", silo commit {m.get('silo_commit')}{' (+ local changes)' if m.get('silo_tree_dirty') else ''}")
    print(f"config:  target {c['target']}  procs {c['procs']}  concurrency {c['concurrency']}/proc"
          f"  workers {c['workers']}/proc  flush {c['flush_interval_ms']} ms"
          f"  shards {c['shards']}  server processes {c.get('server_processes') or 'n/a'}"
          f"  warmup {c['warmup_s']} s  window {c['duration_s']} s")
    print(f"         steady rate {c['rate']}/s  drain backlog {c['backlog']:,}"
          f"  tenants scenario {c['many_tenants']:,} tenants")
    if c.get("baseline"):
        print("baseline: each scenario also ran against bench/noop_server.py (same RPCs and"
              " gRPC settings, no storage)")
    if c["target_mode"] == "self-started" or c.get("baseline"):
        print("note:    load generator and server share this machine's cores")
    busy = m.get("busy_pct_before_start")
    if busy is not None and busy > 10:
        print(f"WARNING: the machine was {busy:.0f} % busy before the run started: other"
              " processes share the cores and skew every figure")
    for name, r in report["scenarios"].items():
        print()
        print(f"== {name} " + "=" * (60 - len(name)))
        ours = scenario_rows(name, r)
        noop_r = r.get("baseline")
        if noop_r is None:
            w = max(len(k) for k, _, _ in ours)
            for k, v, vd in ours:
                print(f"  {k:<{w}}  {v}" + (f"   {vd}" if vd else ""))
            print_details(r)
            continue
        noop_rows = scenario_rows(name, noop_r)
        noop = {k: v for k, v, _ in noop_rows}
        noop_warn = {k: vd for k, _, vd in noop_rows if vd.startswith("[WARNING")}
        labels = [k for k, _, _ in ours] + [k for k in noop if k not in {x[0] for x in ours}]
        ours_d = {k: (v, vd) for k, v, vd in ours}
        w = max(len(k) for k in labels)
        w1 = max([len("ours")] + [len(v) for v, _ in ours_d.values()])
        w2 = max([len("no-op")] + [len(v) for v in noop.values()])
        print(f"  {'':<{w}}  {'ours':<{w1}}  no-op")
        for k in labels:
            v, vd = ours_d.get(k, ("", ""))
            if k in noop_warn:
                vd = f"{vd} [no-op run: {noop_warn[k][1:]}".strip()
            line = f"  {k:<{w}}  {v:<{w1}}  {noop.get(k, ''):<{w2}}"
            print((line + f"  {vd}") if vd else line.rstrip())
        cmp_ = r.get("vs_baseline") or {}
        _, _, rate_label, op = BASELINE_KEYS[name]
        print(f"  -> ours as % of the no-op rate ({rate_label}): {fmt(cmp_.get('rate_pct_of_noop'), ' %')}")
        delta = cmp_.get("server_cpu_us_over_noop")
        print(f"  -> our server CPU / {op} minus the no-op's (storage + state machine): "
              + ("n/a" if delta is None else f"{delta:+,.1f} µs"))
        if cmp_.get("pickup_p99_ms_over_noop") is not None:
            print(f"  -> our enqueue→received p99 minus the no-op's: {cmp_['pickup_p99_ms_over_noop']:+,.1f} ms")
        print_details(r, "ours: ")
        print_details(noop_r, "no-op: ")
    print()


