#!/usr/bin/env python3
"""Load generator for a Silo server: enqueue rate, latency at a fixed rate, backlog
drain, end-to-end saturation and many tenants, each optionally next to a no-op baseline.

    /tmp/venv/bin/python bench/load.py [--target HOST:PORT] [--duration 10] [--procs 2]
        [--concurrency 64] [--flush-interval-ms 10]
        [--scenario enqueue,steady,drain,saturation,tenants|e2e|all]
        [--rate 500] [--backlog 20000] [--many-tenants 10000] [--baseline] [--json out.json]

Without --target the script starts its own `silo serve` (temp data dir, port 0,
--shards 8) for each scenario and always stops it again. Load comes from --procs
client processes (multiprocessing, spawn), each with its own uvloop event loop and
grpc.aio channel. With --baseline, each scenario is then run again, identically,
against bench/noop_server.py (the same RPCs and gRPC server settings, no storage), and
the report puts the two side by side. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import (
    ServerProc,
    fetch_topology,
    machine_cpu,
    machine_info,
    proc_cpu_s,
    server_processes,
    shard_for,
    tree_cpu_by_pid,
    tree_cpu_s,
)
from load_client import (
    C_DONE,
    C_EMPTY,
    C_ENQ,
    C_ERR,
    C_FILLED,
    C_LEASE,
    CLIENT_START_TIMEOUT_S,
    DEFAULT_TENANT,
    EMPTY_POLL_SLEEP_S,
    LEASE_BATCH,
    N_COUNTERS,
    TARGETS,
    TASK_GROUP,
    client_main,
)
from load_report import compare_baseline, print_report, summarize

# Scenarios: name -> what the client processes do.
#   enqueue: closed-loop Enqueue only; mixed: enqueuers + workers, closed loop;
#   steady: Enqueue at a fixed rate + workers; drain: pre-fill, then workers only.
MODES = {
    "enqueue": "enqueue",
    "steady": "steady",
    "drain": "drain",
    "saturation": "mixed",
    "tenants": "mixed",
}
ALIASES = {"e2e": "saturation"}
# `--scenario all`: the standard suite, in this order.
STANDARD = ["enqueue", "steady", "drain", "saturation", "tenants"]


# Shared counter slots per client process (read by the parent for progress and phases).





# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# server management
# ---------------------------------------------------------------------------




# ---------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------


def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def split_quota(n: int, parts: int) -> list[int]:
    """n jobs over `parts` processes, as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class Progress:
    """A progress line on stderr once a second (rates over the last second) and the
    same figures kept for the JSON report."""

    def __init__(self, label: str, mode: str, server_pid: int | None, server: ServerProc | None,
                 counters: Any, nprocs: int, start: float, fill_total: int = 0):
        self.label, self.mode = label, mode
        self.server_pid, self.server = server_pid, server
        self.counters, self.nprocs = counters, nprocs
        self.start = start
        self.fill_total = fill_total
        self.tick = start + 1.0
        self.last_t, self.last_tot = start, [0] * N_COUNTERS
        self.last_srv = tree_cpu_s(server_pid) if server_pid else None
        self.rows: list[dict[str, Any]] = []

    def totals(self) -> list[int]:
        return [sum(self.counters[s * N_COUNTERS + k] for s in range(self.nprocs))
                for k in range(N_COUNTERS)]

    def maybe(self, now: float, phase: str) -> None:
        if now < self.tick:
            return
        tot = self.totals()
        srv = tree_cpu_s(self.server_pid) if self.server_pid else None
        dtt = now - self.last_t
        rate = [(a - b) / dtt for a, b in zip(tot, self.last_tot, strict=True)]
        cpu_pct = (100 * (srv - self.last_srv) / dtt) if (srv is not None and self.last_srv is not None) else None
        line = f"[{self.label}] t={now - self.start:5.1f}s {phase:7s} enq/s={rate[C_ENQ]:7.0f}"
        if phase == "fill":
            left = self.fill_total - tot[C_ENQ]
            eta = f" eta {left / rate[C_ENQ]:4.0f}s" if rate[C_ENQ] > 0 else ""
            line += f" filled={tot[C_ENQ]:,}/{self.fill_total:,}{eta}"
        if self.mode != "enqueue" and phase != "fill":
            line += (f" done/s={rate[C_DONE]:7.0f} lease/s={rate[C_LEASE]:6.0f}"
                     f" empty/s={rate[C_EMPTY]:5.0f}")
        if phase == "drain" and self.mode == "drain":
            line += f" left={tot[C_ENQ] - tot[C_DONE]:,}"
        line += f" errors={tot[C_ERR]}"
        if cpu_pct is not None:
            line += f" server_cpu={cpu_pct:5.1f}%"
        if self.server is not None and not self.server.alive():
            line += " SERVER EXITED"
        print(line, file=sys.stderr, flush=True)
        self.rows.append({"t": round(now - self.start, 2), "phase": phase,
                          "enq_per_s": round(rate[C_ENQ], 1), "done_per_s": round(rate[C_DONE], 1),
                          "errors_total": tot[C_ERR],
                          "server_cpu_pct": None if cpu_pct is None else round(cpu_pct, 1)})
        self.last_t, self.last_tot, self.last_srv = now, tot, srv
        while self.tick <= now:
            self.tick += 1.0


def run_scenario(name: str, args: argparse.Namespace, target: str, server_pid: int | None,
                 server: ServerProc | None, label: str | None = None) -> dict[str, Any]:
    """Run one scenario's client processes against `target` and summarize. `name` is a
    scenario of MODES, or "fill" (pre-fill --backlog jobs only; used by deep_queue.py)."""
    label = label or name
    mode = "fill" if name == "fill" else MODES[name]
    ctx = mp.get_context("spawn")
    owners = fetch_topology(target)
    if args.tenants > 0:
        tenants = [f"bench-tenant-{i}" for i in range(args.tenants)]
        routes = [(shard_for(owners, t), t) for t in tenants]
    else:
        routes = [(shard_for(owners, DEFAULT_TENANT), None)]
    fill_total = args.backlog if mode in ("drain", "fill") else 0
    cfg = {
        "target": target, "mode": mode, "procs": args.procs, "concurrency": args.concurrency,
        "workers": args.workers, "channels": args.channels, "warmup": args.warmup,
        "duration": args.duration, "call_timeout": args.call_timeout, "routes": routes,
        "run_id": f"{os.getpid():x}{int(time.time() * 1000) % 10**9:x}{name[0]}",
        "max_ops": args.max_ops, "rate": args.rate,
        "quotas": split_quota(fill_total, args.procs),
        "fill_timeout": args.fill_timeout, "drain_timeout": args.drain_timeout,
    }
    counters = ctx.RawArray("q", args.procs * N_COUNTERS)
    shared = {"counters": counters, "go": ctx.Event(), "t0": ctx.RawValue("d", 0.0),
              "go2": ctx.Event(), "t1": ctx.RawValue("d", 0.0)}
    ready_q = ctx.Queue()
    result_q = ctx.Queue()
    procs = [ctx.Process(target=client_main, name=f"bench-client-{i}", daemon=True,
                         args=(i, cfg, shared, ready_q, result_q))
             for i in range(args.procs)]
    results: dict[int, dict[str, Any]] = {}
    extra: dict[str, Any] = {"mode": mode, "routes": len(routes),
                             "shards_used": len({r[0] for r in routes})}

    def snap() -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "server": tree_cpu_s(server_pid) if server_pid else None,
            "server_by_pid": tree_cpu_by_pid(server_pid) if server_pid else {},
            "clients": sum(c for p in procs if p.pid and (c := proc_cpu_s(p.pid)) is not None),
            "machine": machine_cpu(),
        }

    def total(idx: int) -> int:
        return sum(counters[s * N_COUNTERS + idx] for s in range(args.procs))

    s_begin = s_end = None
    try:
        for p in procs:
            p.start()
        ready_deadline = time.monotonic() + CLIENT_START_TIMEOUT_S
        n_ready = 0
        while n_ready < len(procs):
            try:
                slot, err = ready_q.get(timeout=0.5)
            except Exception:  # queue.Empty: check the clients are still alive
                dead = [p.name for p in procs if p.exitcode is not None]
                if dead or time.monotonic() > ready_deadline:
                    raise RuntimeError("client processes did not start: "
                                       + (f"{', '.join(dead)} exited" if dead else "timeout")) from None
                continue
            if err:
                raise RuntimeError(f"client {slot} failed to start: {err}")
            n_ready += 1
        start = time.monotonic() + 0.2
        shared["t0"].value = start
        shared["go"].set()
        prog = Progress(label, mode, server_pid, server, counters, args.procs, start, fill_total)
        if mode in ("enqueue", "mixed", "steady"):
            # progress once a second, window snapshots at its edges
            win_start = start + args.warmup
            win_end = win_start + args.duration
            while s_end is None:
                nxt = min(x for x in (prog.tick, win_start if s_begin is None else None,
                                      win_end if s_end is None else None) if x is not None)
                sleep_until(nxt)
                now = time.monotonic()
                if s_begin is None and now >= win_start:
                    s_begin = snap()
                if s_end is None and now >= win_end:
                    s_end = snap()
                mid = now - 0.5  # label the second that just ended
                prog.maybe(now, "warmup" if mid < win_start else ("measure" if mid < win_end else "finish"))
        else:
            # pre-fill (not timed for drain), then drain until every pre-filled job is done
            s_begin = snap()
            fill_deadline = start + args.fill_timeout + args.call_timeout + 10
            while True:
                time.sleep(0.02)
                now = time.monotonic()
                prog.maybe(now, "fill")
                if total(C_FILLED) >= args.procs:
                    break
                # a client that finished its share of a "fill" exits; one that died early is a failure
                if now > fill_deadline or any(p.exitcode is not None and not counters[i * N_COUNTERS + C_FILLED]
                                              for i, p in enumerate(procs)):
                    break
            fill_end = time.monotonic()
            filled = total(C_ENQ)
            extra.update({"fill_complete": total(C_FILLED) >= args.procs and filled >= fill_total,
                          "filled": filled, "fill_s": round(fill_end - start, 3),
                          "fill_per_s": round(filled / max(1e-9, fill_end - start), 1)})
            if mode == "fill":
                s_end = snap()
            elif not extra["fill_complete"]:
                shared["t1"].value = -1.0  # tells the clients to return at once
                shared["go2"].set()
                extra["fatal"] = (f"pre-fill incomplete: {filled:,} of {fill_total:,} jobs after"
                                  f" {fill_end - start:.0f} s")
            else:
                d0 = time.monotonic() + 0.2
                shared["t1"].value = d0
                shared["go2"].set()
                extra["drain_start"] = d0
                sleep_until(d0)
                s_begin = snap()
                prog.start = d0
                prog.tick = d0 + 1.0
                prog.last_t, prog.last_tot = d0, prog.totals()
                prog.last_srv = tree_cpu_s(server_pid) if server_pid else None
                while True:
                    time.sleep(0.02)
                    now = time.monotonic()
                    prog.maybe(now, "drain")
                    if total(C_DONE) >= filled:
                        break
                    if now > d0 + args.drain_timeout or not all(p.is_alive() for p in procs):
                        break
                s_end = snap()
        # collect results; every client stops by its deadline + call_timeout + 5 s on its own
        deadline = time.monotonic() + args.call_timeout + 20
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                slot, res = result_q.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                break
            results[slot] = res
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        common.reap(procs)
    missing = [i for i in range(len(procs)) if i not in results]
    out = summarize(name, mode, args, results, missing, s_begin, s_end or snap(), prog.rows, server, extra)
    if "fatal" in extra:
        out["fatal"] = extra["fatal"]
    return out


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def parse_scenarios(spec: str) -> list[str]:
    """A comma list of scenarios (aliases resolved, `all` = the standard suite), in order,
    without repeats."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        names = STANDARD if part == "all" else [ALIASES.get(part, part)]
        for n in names:
            if n not in MODES:
                raise ValueError(f"unknown scenario {part!r}; choose from "
                                 f"{', '.join([*MODES, *ALIASES, 'all'])}")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no scenario given")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--target", metavar="HOST:PORT",
                    help="existing server to load (default: start one per scenario)")
    ap.add_argument("--server-pid", type=int, help="with --target: server pid, for its CPU figures")
    ap.add_argument("--scenario", default="all",
                    help="comma list of: enqueue, steady, drain, saturation (alias e2e), tenants;"
                         f" all = {','.join(STANDARD)}")
    ap.add_argument("--duration", type=float, default=10.0, help="measured window, seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="load before the window, seconds")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="calls in flight per process (saturation/tenants: half of it enqueues;"
                         " steady: cap on Enqueue calls in flight; drain: pre-fill calls in flight)")
    ap.add_argument("--workers", type=int, default=4,
                    help="worker poll loops per process (LeaseTasks max_tasks=16 each)")
    ap.add_argument("--rate", type=float, default=500.0,
                    help="steady: enqueues per second, all client processes together")
    ap.add_argument("--backlog", type=int, default=20_000, help="drain: jobs pre-filled before draining")
    ap.add_argument("--fill-timeout", type=float, default=300.0,
                    help="drain: give up the pre-fill after this many seconds")
    ap.add_argument("--drain-timeout", type=float, default=180.0,
                    help="drain: give up draining after this many seconds")
    ap.add_argument("--many-tenants", type=int, default=10_000,
                    help="tenants: number of tenants (the server gets --tenancy)")
    ap.add_argument("--channels", type=int, default=1, help="gRPC channels per client process")
    ap.add_argument("--tenants", type=int, default=0,
                    help="scenarios other than `tenants`: spread over N tenants (self-started"
                         " server gets --tenancy); 0 = none")
    ap.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each RPC, s")
    ap.add_argument("--max-ops", type=int, default=10_000_000,
                    help="safety cap on iterations of each client loop")
    common.add_server_args(ap)
    ap.add_argument("--baseline", action="store_true",
                    help="after each scenario, run it again against bench/noop_server.py"
                         " (no storage) and report ours as a share of that")
    ap.add_argument("--tree", metavar="DIR",
                    help="run the self-started server from this source tree (e.g. `git archive "
                         "c5d8260 | tar -x -C DIR`, main before the query indexes) to compare")
    a = ap.parse_args(argv)
    try:
        a.scenarios = parse_scenarios(a.scenario)
    except ValueError as e:
        ap.error(str(e))
    if a.target:
        host = a.target.rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost"):
            ap.error("--target must be on 127.0.0.1 (this tool only loads a local server)")
    if a.duration <= 0 or a.warmup < 0 or a.procs < 1 or a.concurrency < 1 or a.workers < 0:
        ap.error("duration > 0, warmup >= 0, procs >= 1, concurrency >= 1, workers >= 0")
    if a.rate <= 0 or a.backlog < 1 or a.many_tenants < 1:
        ap.error("rate > 0, backlog >= 1, many-tenants >= 1")
    if a.workers < 1 and any(MODES[s] != "enqueue" for s in a.scenarios):
        ap.error("scenarios with workers need --workers >= 1")
    return a


def scenario_args(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """The options one scenario runs with: `tenants` spreads over --many-tenants tenants."""
    a = copy.copy(args)
    if name == "tenants":
        a.tenants = args.many_tenants
    return a


def run_against(name: str, args: argparse.Namespace, kind: str,
                report: dict[str, Any]) -> dict[str, Any]:
    """Run one scenario against our server (kind "silo": --target or self-started) or
    against a self-started no-op server (kind "noop"); always stop what was started."""
    server = None
    sargs = scenario_args(name, args)
    label = name if kind == "silo" else f"{name}/noop"
    try:
        if kind == "silo" and args.target:
            target, pid = args.target, args.server_pid
        else:
            server = ServerProc(sargs, kind)
            target = server.start()
            pid = server.pid
            report["config"].setdefault("server_cmd" if kind == "silo" else "baseline_cmd", {})[name] = server.cmd
            print(f"[{label}] server pid {pid} on {target}", file=sys.stderr, flush=True)
        try:
            res = run_scenario(name, sargs, target, pid, server, label)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            res = {"fatal": f"{type(e).__name__}: {e}"}
        if server is not None:
            code = server.stop()
            res["server_exit_code"] = code
            bad = res.get("error_total") or "fatal" in res or code not in (0, None)
            if bad:
                res["server_stderr_tail"] = server.tail(40)
            res["server_log_warnings"] = [ln for ln in server.log_text().splitlines()
                                          if re.search(r"\b(ERROR|WARNING|CRITICAL)\b|Traceback", ln)][:50]
        return res
    finally:
        if server is not None:
            server.stop()
            server.cleanup()


def failed(res: dict[str, Any]) -> bool:
    return bool(res.get("error_total")) or "fatal" in res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "target": args.target or "self-started 127.0.0.1:0",
            "target_mode": "external" if args.target else "self-started",
            "scenarios": args.scenarios,
            "procs": args.procs, "concurrency": args.concurrency, "workers": args.workers,
            "channels": args.channels, "flush_interval_ms": args.flush_interval_ms,
            "duration_s": args.duration, "warmup_s": args.warmup, "shards": common.shards_of(args),
            "server_processes": None if args.target else server_processes(args),
            "tenants": args.tenants, "many_tenants": args.many_tenants, "rate": args.rate,
            "backlog": args.backlog, "lease_batch": LEASE_BATCH, "task_group": TASK_GROUP,
            "empty_poll_sleep_ms": EMPTY_POLL_SLEEP_S * 1000,
            "baseline": args.baseline,
            "argv": sys.argv,
        },
        "targets": TARGETS,
        "scenarios": {},
    }

    common.interrupt_on_sigterm()
    rc = 0
    try:
        for name in args.scenarios:
            res = run_against(name, args, "silo", report)
            report["scenarios"][name] = res
            if failed(res):
                rc = 1
            if common._interrupted:
                raise KeyboardInterrupt
            if args.baseline:
                noop = run_against(name, args, "noop", report)
                res["baseline"] = noop
                res["vs_baseline"] = compare_baseline(name, res, noop)
                if failed(noop):
                    rc = 1
                if common._interrupted:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    if report["scenarios"]:
        print_report(report)
        print(f"wall time {report['wall_s']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            print(f"JSON report written to {args.json}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
