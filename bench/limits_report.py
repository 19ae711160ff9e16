"""bench/limits.py's printed report."""


from typing import Any

from limits_harness import (
    OTHER_LOAD_WARN_CORES,
    TARGETS,
    TP_LEASE_BATCH,
    TP_MAX_CONCURRENCY,
    TP_TENANTS,
)

# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def lat_str(d: dict[str, Any] | None, keys: tuple[str, ...] = ("p50", "p90", "p99", "max")) -> str:
    if not d or not d.get("n"):
        return "n/a"
    return " / ".join(fmt(d[k]) for k in keys) + f" ms  ({'/'.join(keys)})"


def other_str(cpu: dict[str, Any] | None) -> str:
    """Busy cores neither the server nor the load generator used; flagged when they skew figures."""
    v = (cpu or {}).get("other_cpu_cores")
    if v is None:
        return "n/a"
    return f"{v:.2f}" + (" [WARNING: other load on the machine]" if v > OTHER_LOAD_WARN_CORES else "")


def verdict(v: float | None, target: float, higher: bool, unit: str = "") -> str:
    if v is None:
        return ""
    ok = v >= target if higher else v <= target
    return f"[target {'≥' if higher else '≤'} {target:g}{unit}: {'met' if ok else 'MISSED'}]"


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    w = max(len(k) for k, _, _ in rows)
    for k, v, vd in rows:
        print(f"  {k:<{w}}  {v}" + (f"   {vd}" if vd else ""))


def print_server(r: dict[str, Any], rows: list[tuple[str, str, str]]) -> None:
    if r.get("server_exit_code") not in (0, None):
        rows.append(("server exit code", f"{r['server_exit_code']} (negative = signal)", ""))
    if r.get("server_alive_at_end") is False:
        rows.append(("SERVER", "had exited before the end of the phase", ""))
    if r.get("server_log_warnings"):
        rows.append(("server log", f"{len(r['server_log_warnings'])} WARNING/ERROR lines (in the JSON)", ""))


def print_report(rep: dict[str, Any]) -> None:
    m, c = rep["machine"], rep["config"]
    print()
    print(f"machine: {m['nproc']} cpus, {m['cpu_model']}, python {m['python']}, grpcio {m['grpcio']},"
          f" silo {m['silo_commit']}{' (+local changes)' if m['silo_tree_dirty'] else ''}")
    print(f"config:  flush {c['flush_interval_ms']} ms, {c['shards']} shards, tenancy on,"
          f" server processes {c['processes'] or 'default'}; load and server share this machine's cores")
    if (m.get("busy_pct_before_start") or 0) > 10:
        print(f"WARNING: the machine was {m['busy_pct_before_start']:.0f} % busy before the run")
    g = rep["scenarios"].get("grant-latency")
    if g is not None:
        print()
        print("== grant-latency " + "=" * 50)
        rows: list[tuple[str, str, str]] = []
        if "fatal" in g:
            rows.append(("FAILED", g["fatal"], ""))
        for name, v in (g.get("variants") or {}).items():
            L = v["grant_latency_ms"]
            poll = "LeaseTasks without shard" if name == "any-shard" else "LeaseTasks(shard=tenant's)"
            rows += [
                (f"{name}: {poll}", f"{v['cycles']} measured cycles, {fmt(v['cycles_per_s'])} cycles/s", ""),
                ("  release -> lease", lat_str(L), ""),
                ("  p50", fmt(L["p50"], " ms"), verdict(L["p50"], TARGETS["grant_p50_ms"], False, " ms")),
                ("  p99", fmt(L["p99"], " ms"), verdict(L["p99"], TARGETS["grant_p99_ms"], False, " ms")),
                ("  polls per grant", f"mean {fmt(v['polls_per_grant_mean'])}, max {fmt(v['polls_per_grant_max'])},"
                 f" {fmt(v['grants_on_first_poll_pct'])} % on the first poll", ""),
                ("  ReportOutcome (release)", lat_str(v["report_latency_ms"], ("p50", "p99")), ""),
                ("  empty LeaseTasks (slot held)", lat_str(v["empty_lease_latency_ms"], ("p50", "p99")), ""),
            ]
        if "fatal" not in g:
            cpu = g["cpu"]
            rows += [
                ("waiters kept parked", f"{g['waiters']} (enqueued {fmt(g['enqueued'])} in all)", ""),
                ("Enqueue of a waiter", lat_str(g["enqueue_latency_ms"], ("p50", "p99")), ""),
                ("server / loadgen CPU", f"{fmt(cpu['server_cpu_cores'])} / {fmt(cpu['loadgen_cpu_cores'])} cores", ""),
                ("other busy cores", other_str(cpu), ""),
                ("grant violations", "none (one holder at a time, strict FIFO)" if not g["violations"]
                 else f"{len(g['violations'])}: " + "; ".join(g["violations"][:5]), ""),
                ("errors", "none" if not g["error_total"] else
                 ", ".join(f"{k}={v}" for k, v in sorted(g["errors"].items())), ""),
            ]
        print_server(g, rows)
        print_rows(rows)
        for msg, n in (g.get("error_messages") or {}).items():
            print(f"    {n:>7,}  {msg}")
    t = rep["scenarios"].get("limited-throughput")
    if t is not None:
        print()
        print("== limited-throughput " + "=" * 45)
        print(f"  4 tenants {', '.join(TP_TENANTS)}; limited = each job carries <tenant>-queue max"
              f" {TP_MAX_CONCURRENCY}; {c['procs']} procs x ({c['concurrency'] // 2} enqueuers +"
              f" {c['workers']} workers, LeaseTasks max {TP_LEASE_BATCH}; {c['channels']} connections);"
              f" window {c['duration_s']} s")
        if not t["rounds"]:
            print("  (no complete limited/unlimited pair)")
            print()
            return
        hdr = ("", "limited", "unlimited")
        lines: list[tuple[str, str, str]] = []
        for rnd in t["rounds"]:
            L, U = rnd["limited"], rnd["unlimited"]
            if len(t["rounds"]) > 1:
                lines.append((f"-- round {rnd['round'] + 1} ({rnd['order']})", "", ""))
            for lab, fn in (
                ("completed jobs/s", lambda r: fmt(r.get("jobs_per_s"))),
                ("enqueues/s", lambda r: fmt(r.get("enqueue_per_s"))),
                ("backlog at end", lambda r: fmt(r.get("backlog_at_end"))),
                ("server CPU / job", lambda r: fmt(r.get("server_cpu_us_per_job"), " µs")),
                ("loadgen CPU / job", lambda r: fmt(r.get("loadgen_cpu_us_per_job"), " µs")),
                ("server CPU (cores)", lambda r: fmt((r.get("cpu") or {}).get("server_cpu_cores"))),
                ("  by process", lambda r: " + ".join(f"{x:.2f}" for x in
                                                      (r.get("cpu") or {}).get("server_cpu_cores_by_process") or [])),
                ("loadgen CPU (cores)", lambda r: fmt((r.get("cpu") or {}).get("loadgen_cpu_cores"))),
                ("machine busy", lambda r: fmt((r.get("cpu") or {}).get("machine_busy_pct"), " %")),
                ("other busy cores", lambda r: other_str(r.get("cpu"))),
                ("enqueue->report p50/p99", lambda r: lat_str(r.get("e2e_latency_ms"), ("p50", "p99"))),
                ("LeaseTasks p50/p99", lambda r: lat_str(r.get("lease_latency_ms"), ("p50", "p99"))),
                ("LeaseTasks", lambda r: f"{fmt(r.get('lease_calls_per_s'))}/s, {fmt(r.get('tasks_per_lease'))}"
                 f" tasks/call, {fmt(r.get('lease_empty_pct'))} % empty"),
                ("tenant shards' process", lambda r: ", ".join(
                    f"{v['process'] or '?'}" for v in (r.get("tenants") or {}).values())),
                ("peak in flight/tenant", lambda r: ", ".join(str(x) for x in
                                                             (r.get("peak_inflight_per_tenant") or {}).values())),
                ("errors", lambda r: r.get("fatal") or ("none" if not r.get("error_total") else
                                                        ", ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())))),
            ):
                lines.append((lab, fn(L), fn(U)))
            for kind, r in (("limited", L), ("unlimited", U)):
                extra: list[tuple[str, str, str]] = []
                print_server(r, extra)
                lines += [(f"{kind}: {k}", v, "") for k, v, _ in extra]
        w0 = max(len(x[0]) for x in [hdr, *lines])
        w1 = max(len(x[1]) for x in [hdr, *lines])
        print(f"  {hdr[0]:<{w0}}  {hdr[1]:<{w1}}  {hdr[2]}")
        for a, b, cc in lines:
            print(f"  {a:<{w0}}  {b:<{w1}}  {cc}".rstrip())
        s = t["summary"]
        pct = s.get("limited_pct_of_unlimited")
        print(f"  -> limited as % of unlimited (completed jobs/s): {fmt(pct, ' %')}   "
              + verdict(pct, TARGETS["limited_pct_of_unlimited"], True, " %"))
        if s.get("server_cpu_us_per_job_delta") is not None:
            print(f"  -> server CPU per job, limited minus unlimited: {s['server_cpu_us_per_job_delta']:+,.1f} µs")
        for rnd in t["rounds"]:
            for kind in ("limited", "unlimited"):
                for msg, n in (rnd[kind].get("error_messages") or {}).items():
                    print(f"    {kind}: {n:>7,}  {msg}")
    print()


