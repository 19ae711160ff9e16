#!/usr/bin/env python3
"""Concurrency-limit benchmarks for Silo: grant latency and limited vs unlimited throughput.

    .venv/bin/python bench/limits.py [--scenario grant-latency|limited-throughput|all]
        [--duration 10] [--flush-interval-ms 10] [--procs 2] [--cycles 400] [--json FILE]

Every phase starts its own `silo serve --tenancy` on 127.0.0.1 (temp data dir, port 0)
and always stops it again (SIGTERM, then SIGKILL). The load runs in client processes
started with multiprocessing "spawn", each with its own uvloop event loop and grpc.aio
channel. Progress goes to stderr, the report to stdout. See bench/README.md.

grant-latency: one tenant, one concurrency key with max 1, ~50 parked waiters kept
  queued by an enqueuer process. A worker process holds the slot, reports success and
  measures from the ReportOutcome returning (the release is durable) to the next waiter
  coming back from LeaseTasks (polled in a tight loop, max_tasks=1, no sleep).
limited-throughput: 4 tenants bench-0..3; every job carries the concurrency limit
  `<tenant>-queue` max 100. Enqueuers and workers (LeaseTasks max_tasks=16, success at
  once) run for --duration; then the same load without limits, each phase on a fresh
  server. Reports completed jobs/s of both, limited as % of unlimited, server CPU per job.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import add_server_args, interrupt_on_sigterm, shards_of
from limits_grant import run_grant_latency
from limits_harness import (
    TARGETS,
    machine_info,
    with_server,
)
from limits_report import print_report
from limits_throughput import run_throughput

# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scenario", choices=("grant-latency", "limited-throughput", "all"), default="all")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="limited-throughput: measured window of each phase, seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="limited-throughput: load before the window, s")
    ap.add_argument("--procs", type=int, default=2, help="limited-throughput: client processes")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="limited-throughput: per process, half of it are enqueue loops")
    ap.add_argument("--workers", type=int, default=4,
                    help="limited-throughput: LeaseTasks(max_tasks=16) loops per process")
    ap.add_argument("--channels", type=int, default=4,
                    help="limited-throughput: gRPC connections per client process")
    ap.add_argument("--repeat", type=int, default=1,
                    help="limited-throughput: limited/unlimited pairs (order alternates)")
    ap.add_argument("--cycles", type=int, default=400, help="grant-latency: measured cycles per variant")
    ap.add_argument("--warmup-cycles", type=int, default=20, help="grant-latency: unmeasured first cycles")
    ap.add_argument("--waiters", type=int, default=50, help="grant-latency: jobs kept parked")
    ap.add_argument("--grant-poll", choices=("any-shard", "own-shard", "both"), default="both",
                    help="grant-latency: LeaseTasks without a shard (as SDK workers poll), with the"
                         " tenant's shard, or both one after the other")
    ap.add_argument("--grant-max-seconds", type=float, default=120.0,
                    help="grant-latency: time cap of the whole scenario")
    ap.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each RPC, s")
    ap.add_argument("--max-ops", type=int, default=10_000_000, help="cap on each client loop's iterations")
    add_server_args(ap)
    a = ap.parse_args(argv)
    if (a.duration <= 0 or a.warmup < 0 or a.procs < 1 or a.concurrency < 2 or a.workers < 1
            or a.cycles < 1 or a.waiters < 1 or a.repeat < 1 or a.channels < 1):
        ap.error("need duration > 0, warmup >= 0, procs >= 1, concurrency >= 2, workers >= 1,"
                 " cycles >= 1, waiters >= 1, repeat >= 1, channels >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "flush_interval_ms": args.flush_interval_ms, "shards": shards_of(args),
            "processes": args.processes, "procs": args.procs, "concurrency": args.concurrency,
            "workers": args.workers, "channels": args.channels, "duration_s": args.duration, "warmup_s": args.warmup,
            "repeat": args.repeat, "cycles": args.cycles, "warmup_cycles": args.warmup_cycles,
            "waiters": args.waiters, "grant_poll": args.grant_poll, "argv": sys.argv,
        },
        "targets": TARGETS,
        "scenarios": {},
    }

    interrupt_on_sigterm()
    rc = 0
    try:
        if args.scenario in ("grant-latency", "all"):
            g = with_server(args, "grant-latency", lambda s, t: run_grant_latency(args, s, t))
            rep["scenarios"]["grant-latency"] = g
            if "fatal" in g or g.get("error_total") or g.get("violations"):
                rc = 1
        if args.scenario in ("limited-throughput", "all"):
            rounds = []
            rep["scenarios"]["limited-throughput"] = tp = {"rounds": rounds, "summary": {}}
            for i in range(args.repeat):
                order = [True, False] if i % 2 == 0 else [False, True]
                rnd: dict[str, Any] = {"round": i, "order": " then ".join(
                    "limited" if x else "unlimited" for x in order)}
                for limited in order:
                    kind = "limited" if limited else "unlimited"
                    label = f"{kind}" + (f" #{i + 1}" if args.repeat > 1 else "")
                    r = with_server(args, label,
                                    lambda s, t, lim=limited, lab=label: run_throughput(args, s, t, lim, lab))
                    rnd[kind] = r
                    if "fatal" in r or r.get("error_total"):
                        rc = 1
                rounds.append(rnd)
            lim = [r["limited"].get("jobs_per_s") or 0.0 for r in rounds]
            unl = [r["unlimited"].get("jobs_per_s") or 0.0 for r in rounds]
            cl = [r["limited"].get("server_cpu_us_per_job") for r in rounds]
            cu = [r["unlimited"].get("server_cpu_us_per_job") for r in rounds]
            tp["summary"] = {
                "limited_jobs_per_s_mean": round(statistics.fmean(lim), 1),
                "unlimited_jobs_per_s_mean": round(statistics.fmean(unl), 1),
                "limited_pct_of_unlimited": (round(100 * sum(lim) / sum(unl), 1) if sum(unl) else None),
                "per_round_pct": [round(100 * a / b, 1) if b else None for a, b in zip(lim, unl, strict=True)],
                "server_cpu_us_per_job_limited": cl,
                "server_cpu_us_per_job_unlimited": cu,
                "server_cpu_us_per_job_delta": (
                    round(statistics.fmean(cl) - statistics.fmean(cu), 1)
                    if all(x is not None for x in cl + cu) else None),
            }
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    if rep["scenarios"]:
        print_report(rep)
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
            print(f"JSON report written to {args.json}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

