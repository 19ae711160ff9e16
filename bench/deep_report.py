"""The report of bench/deep_queue.py: issue 12's targets for a deep queue and the table."""

from __future__ import annotations

from typing import Any

import load_report


def targets(r: dict[str, Any], owner: int | None) -> dict[str, Any]:
    """Issue 12's three figures for a deep queue, each with its verdict: the deep shard's
    owner's RSS at depth minus at 1,000 queued (<= 100 MB), restart to first task leased
    (<= 1 s; also from the ready line, which excludes process start-up), and LeaseTasks
    p50 at depth / at 1,000 (<= 1.2)."""
    out: dict[str, Any] = {}
    if owner is not None and r.get("rss_ref") and r.get("rss_deep"):
        a = r["rss_ref"][owner + 1]["rss_kb"] or 0
        b = r["rss_deep"][owner + 1]["rss_kb"] or 0
        out["rss_growth_mb"] = round((b - a) / 1024, 1)
        out["rss_ok"] = out["rss_growth_mb"] <= 100
        settled = (r.get("rss_deep_settled") or {}).get("rss_kb")
        if settled is not None:
            out["rss_settled_growth_mb"] = round((settled - a) / 1024, 1)
    rs = r.get("restart") or {}
    if rs.get("first_task_s") is not None:
        out["restart_to_first_task_s"] = rs["first_task_s"]
        out["restart_ok"] = rs["first_task_s"] <= 1.0
    g = r.get("lease_growth")
    if g:
        out["lease_p50_ratio"] = g["p50_ratio"]
        out["lease_ok"] = g["p50_ratio"] <= 1.2
    return out


def mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:,.0f} MB"


def print_report(rep: dict[str, Any]) -> None:
    m, c, r = rep["machine"], rep["config"], rep["results"]
    print()
    print(f"machine: {m['nproc']} cpus, {m['cpu_model']}, python {m['python']}, grpcio {m['grpcio']}"
          f", silo commit {m.get('silo_commit')}{' (+ local changes)' if m.get('silo_tree_dirty') else ''}")
    depth = f"a copy of {c['from_dir']}" if c.get("from_dir") else f"{c['jobs']:,} jobs in one shard"
    print(f"config:  {depth} (tenancy off), shards {c['shards']},"
          f" flush {c['flush_interval_ms']} ms, server processes {c['server_processes']},"
          f" pre-fill {c['procs']} procs x {c['concurrency']} in flight, bytecode cache"
          f" {'on' if c.get('bytecode_cache') else 'off (compiled at every start)'}")
    print()
    print("== deep queue " + "=" * 52)
    rows: list[tuple[str, str]] = []
    for key, label in (("fill_ref", "pre-fill to 1,000"), ("fill_deep", "pre-fill to depth")):
        f = r.get(key)
        if f:
            rows.append((label, f"{f.get('filled', 0):,} jobs in {load_report.fmt(f.get('fill_s'), ' s')}"
                         f" = {load_report.fmt(f.get('fill_per_s'))} enqueues/s,"
                         f" server CPU {load_report.fmt(f.get('server_cpu_us_per_enqueue'), ' µs')}/Enqueue,"
                         f" errors {f.get('error_total', 0)}"))
    if r.get("fill_rate_first_last_10s"):
        a, b = r["fill_rate_first_last_10s"]
        rows.append(("  enqueue rate, first / last 10 s", f"{load_report.fmt(a)} / {load_report.fmt(b)} per s"))
    for key, label in (("probe_ref", "LeaseTasks at 1,000 queued"),
                       ("probe_deep", "LeaseTasks at depth"),
                       ("probe_restarted", "LeaseTasks after restart")):
        p = r.get(key)
        if p:
            depth = r.get(key.replace("probe", "depth"))
            rows.append((label, load_report.lat_str(p["latency_ms"]) + f"  (mean {load_report.fmt(p['mean_ms'])} ms,"
                         f" {p['calls']} calls, {p['empty']} empty"
                         + (f", {depth:,} queued" if depth is not None else "") + ")"))
    if r.get("lease_growth"):
        g = r["lease_growth"]
        rows.append(("  depth / 1,000 queued", f"p50 x{load_report.fmt(g['p50_ratio'])}  p99 x{load_report.fmt(g['p99_ratio'])}"
                     f"  -> {g['verdict']}"))
    for key, label in (("rss_deep", "RSS at depth"), ("rss_restarted", "RSS after restart")):
        if r.get(key):
            rows.append((label, ", ".join(f"{x['role']} {mb(x['rss_kb'])}" for x in r[key])))
            rows.append(("  total / peak (VmHWM)", f"{mb(sum(x['rss_kb'] or 0 for x in r[key]))}"
                         f" / {', '.join(mb(x['hwm_kb']) for x in r[key])}"))
    if r.get("rss_deep_settled"):
        x = r["rss_deep_settled"]
        rows.append(("  owner once settled", f"{mb(x['rss_kb'])} after {x['after_s']} s more"
                     " (the fill's compaction done)"))
    if r.get("data_dir_bytes") is not None:
        rows.append(("data dir at depth", f"{r['data_dir_bytes'] / 2**20:,.0f} MB"))
    rs = r.get("restart")
    if rs:
        rows.append(("SIGTERM -> exited", f"{load_report.fmt(rs.get('stop_s'), ' s')} (exit code {rs.get('exit_code')})"))
        rows.append(("start -> ready line", load_report.fmt(rs.get("ready_s"), " s")))
        rows.append(("start -> first LeaseTasks OK", load_report.fmt(rs.get("first_ok_s"), " s")))
        rows.append(("start -> first task leased", load_report.fmt(rs.get("first_task_s"), " s")))
        rows.append(("  server CPU until then", load_report.fmt(rs.get("cpu_to_first_task_s"), " s")
                     + f" (supervisor, workers: {rs.get('cpu_to_first_task_by_process_s')})"))
    for i, x in enumerate(r.get("starts") or []):
        rows.append((f"  start {i + 1}: first OK / task / ready",
                     f"{x.get('first_ok_s')} / {x.get('first_task_s')} / {x.get('ready_s')} s"
                     f" (SIGTERM -> exited {x.get('stop_s')} s); server CPU to first task"
                     f" {x.get('cpu_to_first_task_s')} s {x.get('cpu_to_first_task_by_process_s')}"))
    t = r.get("targets") or {}
    if t:
        def ok(k: str) -> str:
            return "ok" if t.get(k) else "MISSED"
        for key, label, text in (
                ("rss_ok", "TARGET owner RSS, depth - 1,000", f"{t.get('rss_growth_mb')} MB"
                 + (f"; settled {t['rss_settled_growth_mb']} MB" if "rss_settled_growth_mb" in t
                    else "") + " (<= 100"),
                ("restart_ok", "TARGET restart -> first task",
                 f"{t.get('restart_to_first_task_s')} s (ready line at"
                 f" {(r.get('restart') or {}).get('ready_s')} s; <= 1"),
                ("lease_ok", "TARGET LeaseTasks p50 depth / 1,000", f"x{t.get('lease_p50_ratio')} (<= 1.2")):
            if key in t:
                rows.append((label, f"{text}: {ok(key)})"))
    if r.get("fatal"):
        rows.append(("FAILED", r["fatal"]))
    rows.append(("server exit code", str(r.get("server_exit_code"))))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    print()
