#!/usr/bin/env python3
"""Deep queue: LeaseTasks latency, restart-to-serving time and RSS with many jobs queued
in one shard.

    /tmp/venv/bin/python bench/deep_queue.py [--jobs 200000] [--json FILE]

Starts its own `silo serve --no-tenancy` (temp data dir, 127.0.0.1 port 0): with tenancy
off every job belongs to tenant "-", so the whole queue is in one shard. Then:

 1. pre-fills 1,000 jobs through the real server (client processes from bench/load.py,
    many Enqueue calls in flight), waits until the server is idle, and times 200
    LeaseTasks(max_tasks=1) calls one after the other (reference depth);
 2. pre-fills up to --jobs queued jobs, waits until idle, times 200 LeaseTasks again, and
    reads the RSS of every server process (supervisor and workers, /proc/PID/status);
 3. stops the server with SIGTERM (timed), starts it again on the same data dir, on a
    gRPC port chosen in advance, with a client already retrying LeaseTasks (reconnecting
    every 5-20 ms) from the moment of the spawn, and times process start -> first
    LeaseTasks answered -> first task leased, and -> the ready line (which also waits for
    the web UI); then RSS and 200 LeaseTasks again.

`--from-dir DIR` skips the pre-fills: the server runs on a copy of DIR, a data dir
filled offline (`bench/fill.py --data-dir DIR --jobs 1000000 --queued-only`, once), and
each of --starts starts is timed as in 3 (the first is the first open after the fill),
with LeaseTasks and RSS at depth after the first.

The server processes get a bytecode cache (a temp PYTHONPYCACHEPREFIX) as an installed
server has one; `--no-bytecode-cache` keeps PYTHONDONTWRITEBYTECODE from the
environment, so every start compiles silo from source.

Every leased task is reported as a success after its measurement (not timed). The server
is always stopped, also on Ctrl-C. See bench/README.md ("Deep queue").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (server management, /proc helpers)
import load  # noqa: E402  (bench/load.py: its scenarios and CLI)
import load_client  # noqa: E402
from deep_report import print_report, targets  # noqa: E402

REF_DEPTH = 1_000
SETTLE_CORES = 0.15  # the server counts as idle below this CPU use (cores, over 0.5 s)
SETTLE_MAX_S = 60.0
WORKER_ID = "deep-queue-probe"


def rss_kb(pid: int) -> dict[str, int | None]:
    """VmRSS and VmHWM (peak) of one process, kB."""
    out: dict[str, int | None] = {"rss_kb": None, "hwm_kb": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm_kb"] = int(line.split()[1])
    except OSError:
        pass
    return out


def server_rss(pid: int, owner: int | None = None) -> list[dict[str, Any]]:
    """RSS of the supervisor and each worker process (its children, in pid order, i.e.
    the order the supervisor forked them); `owner` = index of the deep shard's worker."""
    rows = [{"role": "supervisor", "pid": pid, **rss_kb(pid)}]
    for i, kid in enumerate(sorted(common.proc_children(pid))):
        role = f"worker {i}" + (" (owns the deep shard)" if i == owner else "")
        rows.append({"role": role, "pid": kid, **rss_kb(kid)})
    return rows


def grew_most(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> int | None:
    """Index of the worker whose RSS grew most between two server_rss() readings: the one
    holding the deep shard (its in-memory indexes grow with the queue)."""
    growth = [((a["rss_kb"] or 0) - (b["rss_kb"] or 0), i)
              for i, (b, a) in enumerate(zip(before[1:], after[1:], strict=False))]
    return max(growth)[1] if growth else None


def mark_owner(rows: list[dict[str, Any]], owner: int | None) -> None:
    if owner is not None and owner + 1 < len(rows):
        rows[owner + 1]["role"] += " (owns the deep shard)"


def dir_bytes(path: Path) -> int:
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                n += os.stat(os.path.join(root, f)).st_size
    return n


def settle(pid: int) -> float:
    """Wait until the server is idle (background flushes and compaction after a fill);
    returns the seconds waited (at most SETTLE_MAX_S)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_MAX_S:
        a = common.tree_cpu_s(pid)
        time.sleep(0.5)
        b = common.tree_cpu_s(pid)
        if a is None or b is None or (b - a) / 0.5 < SETTLE_CORES:
            break
    return round(time.monotonic() - t0, 2)


def settled_rss(pid: int, step_s: float = 2.5, steady: int = 4, max_s: float = 90.0
                ) -> dict[str, Any]:
    """The owner's RSS once it stops moving (`steady` readings in a row, step_s apart,
    within 1 MB of each other): after a fill the compaction of its L0 SSTs holds memory
    for ~10-25 s while using too little CPU for settle() to see it, so the reading at
    idle is a transient (with plateaus of a few seconds, hence several readings)."""
    t0 = time.monotonic()
    seen = [rss_kb(pid)["rss_kb"] or 0]
    while time.monotonic() - t0 < max_s:
        time.sleep(step_s)
        seen = (seen + [rss_kb(pid)["rss_kb"] or 0])[-(steady + 1):]
        if len(seen) > steady and max(seen) - min(seen) <= 1024:
            break
    return {"rss_kb": seen[-1], "after_s": round(time.monotonic() - t0, 1)}


def probe(target: str, samples: int, pid: int, call_timeout: float) -> dict[str, Any]:
    """`samples` LeaseTasks(max_tasks=1) calls one after the other on one connection;
    then ReportOutcome(success) for every leased task, all at once (not timed)."""
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    lat_us: list[float] = []
    tasks = []
    empty = 0
    cpu0 = common.tree_cpu_by_pid(pid)
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.SiloStub(ch)
        req = pb.LeaseTasksRequest(worker_id=WORKER_ID, max_tasks=1, task_group=load_client.TASK_GROUP)
        stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=call_timeout)  # connect first
        for _ in range(samples):
            t = time.perf_counter()
            resp = stub.LeaseTasks(req, timeout=call_timeout)
            lat_us.append((time.perf_counter() - t) * 1e6)
            if resp.tasks:
                tasks.extend(resp.tasks)
            else:
                empty += 1
        cpu1 = common.tree_cpu_by_pid(pid)
        ok = b"\x81\xa2ok\xc3"  # msgpack {"ok": True}
        futs = []
        for task in tasks:
            r = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id,
                                        success=pb.SerializedBytes(msgpack=ok))
            if task.HasField("tenant_id"):
                r.tenant_id = task.tenant_id
            futs.append(stub.ReportOutcome.future(r, timeout=call_timeout))
        report_errors = 0
        for f in futs:
            try:
                f.result()
            except grpc.RpcError:
                report_errors += 1
    by_proc = sorted(((p, c - cpu0.get(p, 0.0)) for p, c in cpu1.items()), key=lambda x: -x[1])
    return {"calls": samples, "empty": empty, "latency_ms": common.percentiles_ms(lat_us),
            "mean_ms": round(sum(lat_us) / len(lat_us) / 1000, 3) if lat_us else None,
            "server_cpu_ms_by_process": {str(p): round(c * 1000, 1) for p, c in by_proc if c > 0},
            "reported": len(tasks) - report_errors, "report_errors": report_errors}


# A client retrying its connection while the server starts: reconnect every few ms
# (gRPC's default back-off starts at 1 s, which would hide when the port opened).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
                  ("grpc.max_reconnect_backoff_ms", 20)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_lease(target: str, deadline: float, call_timeout: float,
                stop: threading.Event | None = None, on_task: Any = None) -> dict[str, Any]:
    """LeaseTasks(max_tasks=1) until one returns a task: times of the first OK call and
    of the first task, time.monotonic(). Started before the server is (its port fixed in
    advance), it measures when the restarted server first serves a lease, like a worker
    fleet that keeps retrying, not when the ready line was read. on_task(out) runs the
    moment the first task arrives."""
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    out: dict[str, Any] = {"first_ok_t": None, "first_task_t": None, "attempts": 0, "errors": {}}
    req = pb.LeaseTasksRequest(worker_id=WORKER_ID, max_tasks=1, task_group=load_client.TASK_GROUP)
    with grpc.insecure_channel(target, options=FAST_RECONNECT) as ch:
        stub = pb_grpc.SiloStub(ch)
        task = None
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            out["attempts"] += 1
            try:
                resp = stub.LeaseTasks(req, timeout=min(call_timeout, max(0.1, deadline - time.monotonic())),
                                       wait_for_ready=True)
            except grpc.RpcError as e:
                k = e.code().name
                out["errors"][k] = out["errors"].get(k, 0) + 1
                time.sleep(0.005)
                continue
            now = time.monotonic()
            if out["first_ok_t"] is None:
                out["first_ok_t"] = now
            if resp.tasks:
                out["first_task_t"] = now
                if on_task is not None:
                    on_task(out)
                task = resp.tasks[0]
                break
            time.sleep(0.005)
        if task is not None:
            r = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id,
                                        success=pb.SerializedBytes(msgpack=b"\x81\xa2ok\xc3"))
            with contextlib.suppress(grpc.RpcError):
                stub.ReportOutcome(r, timeout=call_timeout)
    return out


def timed_restart(server: common.ServerProc, a: argparse.Namespace, queued: int | None
                  ) -> dict[str, Any]:
    """Stop the server (if running, timed) and start it again on the same data dir, on a
    gRPC port chosen in advance, with a client already retrying LeaseTasks from just
    before the spawn: process start -> first LeaseTasks answered -> first task leased,
    and -> the ready line."""
    t = time.monotonic()
    was_running = server.alive()
    code = server.stop()
    rs: dict[str, Any] = {"stop_s": round(time.monotonic() - t, 3) if was_running else None,
                          "exit_code": code, "queued": queued}
    server.poll_s = 0.005
    port = free_port()
    server.args.server_arg = [*a.server_arg, "--grpc-addr", f"127.0.0.1:{port}"]
    fl: dict[str, Any] = {}
    stop = threading.Event()
    def cpu_now(out: dict[str, Any]) -> None:  # the server's CPU until its first lease
        if server.pid is not None:
            out["cpu"] = common.tree_cpu_by_pid(server.pid)

    prober = threading.Thread(target=lambda: fl.update(first_lease(
        f"127.0.0.1:{port}", time.monotonic() + a.restart_timeout, a.call_timeout, stop,
        cpu_now)))
    prober.start()
    try:
        server.start(ready_timeout=a.restart_timeout)
    except BaseException:
        stop.set()
        raise
    finally:
        prober.join()
    assert server.spawn_t is not None and server.ready_t is not None
    rs["ready_s"] = round(server.ready_t - server.spawn_t, 3)
    rs["first_lease_attempts"], rs["first_lease_errors"] = fl.get("attempts"), fl.get("errors")
    if fl.get("first_ok_t") is not None:
        rs["first_ok_s"] = round(fl["first_ok_t"] - server.spawn_t, 3)
    if fl.get("first_task_t") is None:
        raise RuntimeError("the restarted server leased no task before --restart-timeout")
    rs["first_task_s"] = round(fl["first_task_t"] - server.spawn_t, 3)
    if fl.get("cpu"):  # supervisor first, then the workers (pid order): CPU s, load-proof
        by_pid = sorted(fl["cpu"].items())
        rs["cpu_to_first_task_s"] = round(sum(c for _, c in by_pid), 3)
        rs["cpu_to_first_task_by_process_s"] = [round(c, 3) for _, c in by_pid]
    return rs


def fill(largs_base: list[str], n: int, target: str, server: common.ServerProc, label: str,
         stream: bool = False) -> dict[str, Any]:
    if stream:
        return fill_stream(n, target, server.pid)
    largs = load.parse_args([*largs_base, "--backlog", str(max(1, n))])
    return load.run_scenario("fill", largs, target, server.pid, server, label)


def fill_stream(n: int, target: str, pid: int | None, batch: int = 500, in_flight: int = 8
                ) -> dict[str, Any]:
    """Pre-fill with the SDK's enqueue_many (EnqueueMany of silostream.v1): the same jobs,
    each durable before its result, many per call. Honest (every job goes through the
    server's enqueue path) and several times faster than one Enqueue per job."""
    import asyncio

    from silo.client import SiloClient

    async def go() -> dict[str, Any]:
        done = errors = 0
        t0 = time.monotonic()
        cpu0 = common.tree_cpu_s(pid) if pid else None
        async with SiloClient(target, topology_refresh_timeout_s=60.0, rpc_timeout_s=120.0) as c:
            left = n

            async def one(k: int) -> None:
                nonlocal done, errors
                res = await c.enqueue_many([{"payload": {"i": i}, "task_group": load_client.TASK_GROUP}
                                            for i in range(k)])
                for r in res:
                    if isinstance(r, Exception):
                        errors += 1
                    else:
                        done += 1

            while left > 0:
                ks = []
                for _ in range(in_flight):
                    if left <= 0:
                        break
                    ks.append(min(batch, left))
                    left -= ks[-1]
                await asyncio.gather(*(one(k) for k in ks))
        wall = time.monotonic() - t0
        cpu1 = common.tree_cpu_s(pid) if pid else None
        cpu_us = (round((cpu1 - cpu0) * 1e6 / max(1, done), 1)
                  if cpu0 is not None and cpu1 is not None else None)
        return {"filled": done, "fill_s": round(wall, 1), "fill_per_s": round(done / wall, 1),
                "server_cpu_us_per_enqueue": cpu_us, "error_total": errors,
                "fill_complete": errors == 0, "via": "EnqueueMany (silostream.v1)"}

    return asyncio.run(go())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200_000,
                    help="queued jobs at depth (1,000,000 is the issue's figure: about 7 min of"
                         " pre-fill on 2 cores)")
    ap.add_argument("--samples", type=int, default=200, help="LeaseTasks calls per measurement")
    ap.add_argument("--procs", type=int, default=2, help="pre-fill client processes")
    ap.add_argument("--concurrency", type=int, default=64, help="Enqueue calls in flight per process")
    ap.add_argument("--fill-timeout", type=float, default=900.0,
                    help="stop filling after this many seconds and measure at the depth reached")
    ap.add_argument("--restart-timeout", type=float, default=300.0,
                    help="give up waiting for the restarted server after this many seconds")
    ap.add_argument("--flush-interval-ms", type=int, default=10)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--processes", type=int, default=0,
                    help="server worker processes (0 = one per core, at most one per shard)")
    ap.add_argument("--call-timeout", type=float, default=10.0)
    ap.add_argument("--fill-stream", action="store_true",
                    help="pre-fill with EnqueueMany (silostream.v1, via the SDK) instead of"
                         " one Enqueue per job: 1,000,000 in a few minutes")
    ap.add_argument("--bytecode-cache", action=argparse.BooleanOptionalAction, default=True,
                    help="let the server processes cache compiled bytecode (a temp"
                         " PYTHONPYCACHEPREFIX), as an installed server has it; --no-bytecode-cache"
                         " keeps PYTHONDONTWRITEBYTECODE from the environment (every start compiles"
                         " silo from source: ~0.2 s more CPU before the first fork)")
    ap.add_argument("--from-dir", metavar="DIR", type=Path,
                    help="no pre-fill: start the server on a copy of DIR (bench/fill.py"
                         " --data-dir DIR --jobs N --queued-only) and time every start")
    ap.add_argument("--starts", type=int, default=4,
                    help="with --from-dir: timed starts (the first after the fill, then restarts;"
                         " the target row shows the median restart)")
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--silo-bin", help="silo executable (default: the one next to this python)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `silo serve` argument")
    ap.add_argument("--keep-data", action="store_true", help="keep the temp data dir and server logs")
    a = ap.parse_args(argv)
    if a.from_dir is not None and not (a.from_dir / "shardmap.json").exists():
        ap.error(f"--from-dir {a.from_dir}: no shardmap.json (fill it with bench/fill.py)")
    if a.jobs < REF_DEPTH + a.samples or a.samples < 1 or a.starts < 1:
        ap.error(f"--jobs must be at least {REF_DEPTH + a.samples}, --samples and --starts"
                 " at least 1")
    return a


def server_args(a: argparse.Namespace) -> argparse.Namespace:
    """The fields ServerProc reads."""
    return argparse.Namespace(silo_bin=a.silo_bin, flush_interval_ms=a.flush_interval_ms,
                              shards=a.shards, tenants=0, processes=a.processes,
                              server_arg=a.server_arg, keep_data=a.keep_data)


def run(a: argparse.Namespace, rep: dict[str, Any]) -> None:
    r = rep["results"]
    server = common.ServerProc(server_args(a), "silo")
    largs_base = ["--procs", str(a.procs), "--concurrency", str(a.concurrency),
                  "--fill-timeout", str(a.fill_timeout), "--call-timeout", str(a.call_timeout)]
    try:
        target = server.start()
        rep["config"]["server_cmd"] = server.cmd
        pid = server.pid
        assert pid is not None
        print(f"[deep] server pid {pid} on {target}", file=sys.stderr, flush=True)

        r["fill_ref"] = f1 = fill(largs_base, REF_DEPTH, target, server, "deep fill 1k",
                                  a.fill_stream)
        if "fatal" in f1 or not f1.get("fill_complete"):
            raise RuntimeError(f"pre-fill to {REF_DEPTH:,} failed: {f1.get('fatal') or f1.get('errors')}")
        r["settle_ref_s"] = settle(pid)
        r["depth_ref"] = f1["filled"]
        print(f"[deep] {a.samples} LeaseTasks at {r['depth_ref']:,} queued", file=sys.stderr, flush=True)
        r["probe_ref"] = p1 = probe(target, a.samples, pid, a.call_timeout)
        queued = r["depth_ref"] - p1["reported"]
        r["rss_ref"] = server_rss(pid)

        r["fill_deep"] = f2 = fill(largs_base, a.jobs - queued, target, server, "deep fill",
                                   a.fill_stream)
        rows = [x["enq_per_s"] for x in f2.get("progress", []) if x["phase"] == "fill"]
        if len(rows) >= 20:
            r["fill_rate_first_last_10s"] = [round(sum(rows[:10]) / 10, 1), round(sum(rows[-10:]) / 10, 1)]
        queued += f2.get("filled", 0)
        r["depth_deep"] = queued
        if "fatal" in f2:
            raise RuntimeError(f"pre-fill failed: {f2['fatal']}")
        if not f2.get("fill_complete"):
            print(f"[deep] pre-fill stopped at {queued:,} queued (--fill-timeout); measuring there",
                  file=sys.stderr, flush=True)
        r["settle_deep_s"] = settle(pid)
        print(f"[deep] {a.samples} LeaseTasks at {queued:,} queued", file=sys.stderr, flush=True)
        r["probe_deep"] = p2 = probe(target, a.samples, pid, a.call_timeout)
        queued -= p2["reported"]
        r["rss_deep"] = server_rss(pid)
        owner = grew_most(r["rss_ref"], r["rss_deep"])
        mark_owner(r["rss_deep"], owner)
        if owner is not None:
            r["rss_deep_settled"] = settled_rss(r["rss_deep"][owner + 1]["pid"])
        r["data_dir_bytes"] = dir_bytes(server.tmp / "data")
        p50a, p50b = p1["latency_ms"]["p50"], p2["latency_ms"]["p50"]
        p99a, p99b = p1["latency_ms"]["p99"], p2["latency_ms"]["p99"]
        if p50a and p99a and p50b is not None and p99b is not None:
            g50, g99 = round(p50b / p50a, 2), round(p99b / p99a, 2)
            r["lease_growth"] = {"p50_ratio": g50, "p99_ratio": g99,
                                 "verdict": "flat (p50 within 1.5x)" if g50 <= 1.5 else "GROWS with depth"}

        # restart on the same data dir
        print(f"[deep] SIGTERM, restart with {queued:,} queued", file=sys.stderr, flush=True)
        r["restart"] = timed_restart(server, a, queued)
        target, pid = server.addr or target, server.pid
        assert pid is not None
        queued -= 1
        r["settle_restarted_s"] = settle(pid)
        r["depth_restarted"] = queued
        r["probe_restarted"] = probe(target, a.samples, pid, a.call_timeout)
        r["rss_restarted"] = server_rss(pid, owner)  # the same shard map: the same worker index
        r["targets"] = targets(r, owner)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        r["fatal"] = f"{type(e).__name__}: {e}"
        r["server_stderr_tail"] = server.tail(40)
    finally:
        r["server_exit_code"] = server.stop()
        server.cleanup()


def run_from_dir(a: argparse.Namespace, rep: dict[str, Any]) -> None:
    """--from-dir: no pre-fill. The server runs on a copy of a filled data dir
    (bench/fill.py --queued-only; the copy keeps the original for the next run) and
    every start is timed as timed_restart times it: the first is the first open after
    the offline fill, each later one a restart after SIGTERM. After the first: settle,
    LeaseTasks at depth, RSS."""
    r = rep["results"]
    server = common.ServerProc(server_args(a), "silo")
    try:
        t = time.monotonic()
        shutil.copytree(a.from_dir, server.tmp / "data", symlinks=True)
        r["copy_s"] = round(time.monotonic() - t, 1)
        r["data_dir_bytes"] = dir_bytes(server.tmp / "data")
        r["starts"] = starts = []
        for i in range(a.starts):
            print(f"[deep] start {i + 1}/{a.starts} on a copy of {a.from_dir}",
                  file=sys.stderr, flush=True)
            starts.append(timed_restart(server, a, None))
            rep["config"]["server_cmd"] = server.cmd
            pid = server.pid
            assert pid is not None and server.addr is not None
            starts[-1]["settle_s"] = settle(pid)
            if i == 0:
                r["probe_deep"] = probe(server.addr, a.samples, pid, a.call_timeout)
                r["rss_deep"] = server_rss(pid)
        # the target's figure: the median restart (the first start is the first open
        # after the fill, and compiles the bytecode cache)
        again = sorted(starts[1:] or starts, key=lambda x: x["first_task_s"])
        r["restart"] = again[(len(again) - 1) // 2]
        r["targets"] = targets(r, None)
    except Exception as e:
        r["fatal"] = f"{type(e).__name__}: {e}"
        r["server_stderr_tail"] = server.tail(40)
    finally:
        r["server_exit_code"] = server.stop()
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    rep: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "config": {"jobs": a.jobs, "ref_depth": REF_DEPTH, "samples": a.samples, "procs": a.procs,
                   "concurrency": a.concurrency, "flush_interval_ms": a.flush_interval_ms,
                   "shards": a.shards, "tenancy": False,
                   "server_processes": common.server_processes(argparse.Namespace(
                       processes=a.processes, shards=a.shards)),
                   "argv": sys.argv},
        "results": {},
    }

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    pyc = None
    if a.bytecode_cache:  # inherited by the server (ServerProc passes os.environ)
        pyc = tempfile.mkdtemp(prefix="silo-deep-pyc-")
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = pyc
    rep["config"]["bytecode_cache"] = a.bytecode_cache
    rep["config"]["from_dir"] = str(a.from_dir) if a.from_dir else None
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rc = 0
    try:
        (run_from_dir if a.from_dir else run)(a, rep)
        if common._interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    res = rep["results"]
    if rc == 0 and ("fatal" in res or res.get("server_exit_code") not in (0, None)
                    or any((res.get(k) or {}).get("error_total") for k in ("fill_ref", "fill_deep"))):
        rc = 1
    if pyc:
        import shutil

        shutil.rmtree(pyc, ignore_errors=True)
    rep["wall_s"] = round(time.monotonic() - t0, 1)
    print_report(rep)
    print(f"wall time {rep['wall_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        print(f"JSON report written to {a.json}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
