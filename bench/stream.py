#!/usr/bin/env python3
"""Stream-protocol scenarios through the Python SDK, beside the same ones on the unary API.

    PYTHONPATH=. .venv/bin/python bench/stream.py [--scenario saturation,steady,idle|all]
        [--protocol stream,unary] [--tenants 16] [--procs 2] [--duration 10] [--json F]
        [--profile DIR [--profile-rate 50] [--no-profile-native] | --perf DIR] [--tree DIR]

Each client process runs one SiloClient: enqueuers (SiloClient.enqueue_many, which is
one EnqueueMany per call on a server that offers silostream.v1 and one Enqueue per job
with --protocol unary) and one silo.worker.Worker (a push stream, or LeaseTasks polling
with --protocol unary) whose handler does nothing. Jobs are spread over --tenants
tenants.

* saturation: closed loop (each process keeps at most --backlog jobs not yet done):
  durable jobs/s end to end (outcome acknowledged), server CPU per job.
* steady: --rate jobs/s (one EnqueueMany per 10 ms tick and process): latency from the
  enqueue call to the handler starting (p50/p99), server CPU per job.
* idle (not in "all"): the server's CPU with nothing connected, for --duration.

Server CPU, its placement over the worker processes, the load generator's CPU and the
machine's other busy CPU come from bench/common.py's CpuWindow. Targets (issue 12):
saturation >= 6,000 jobs/s at <= 150 us server CPU per job; steady 500/s p50 <= 3 ms,
p99 <= 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    CpuWindow,
    ServerProc,
    add_server_args,
    machine_info,
    percentiles_ms,
    proc_children,
    shards_of,
)

TASK_GROUP = "bench-stream"
TARGETS = {"jobs_per_s": 6000.0, "server_cpu_us_per_job": 150.0, "p50_ms": 3.0,
           "p99_ms": 10.0}
TICK_S = 0.01


def client_main(slot: int, cfg: dict[str, Any], q: Any) -> None:
    import uvloop

    q.put((slot, uvloop.run(client(slot, cfg))))


async def client(slot: int, cfg: dict[str, Any]) -> dict[str, Any]:
    from silo.client import SiloClient
    from silo.worker import Worker

    tenants = [f"tenant-{i}" for i in range(cfg["tenants"])] or [None]
    t_start, t_end = cfg["window"]
    lat_us: list[float] = []
    counts = {"enqueued": 0, "enq_errors": 0}

    async def handler(ctx):
        sent = ctx.task.metadata.get("t")
        now = time.time()
        if sent and t_start <= now < t_end:
            lat_us.append((now - float(sent)) * 1e6)

    stream = cfg["protocol"] == "stream"
    async with SiloClient([cfg["target"]], topology_refresh_interval_s=0) as c:
        worker = Worker(c, TASK_GROUP, handler, concurrency=cfg["slots"], stream=stream,
                        poll_interval=0.005, tasks_per_poll=16)
        if not stream:
            c.__dict__["_stream_support"] = {cfg["target"]: False}  # unary EnqueueMany too
        await worker.start()
        i = 0

        def batch(n: int) -> list[dict[str, Any]]:
            nonlocal i
            out = []
            for _ in range(n):
                t = tenants[i % len(tenants)]
                i += 1
                out.append({"payload": None, "task_group": TASK_GROUP, "tenant": t,
                            "metadata": {"t": repr(time.time())}})
            return out

        async def send(n: int) -> None:
            res = await c.enqueue_many(batch(n))
            ok = sum(1 for r in res if not isinstance(r, Exception))
            counts["enqueued"] += ok
            counts["enq_errors"] += len(res) - ok

        end = t_end + 0.5
        if cfg["scenario"] == "saturation":
            async def enqueuer() -> None:
                while time.time() < end:
                    if counts["enqueued"] - worker.stats.succeeded > cfg["backlog"]:
                        await asyncio.sleep(0.002)
                        continue
                    await send(cfg["batch"])
            await asyncio.gather(*(enqueuer() for _ in range(cfg["enqueuers"])))
        else:
            per_tick = cfg["rate"] / cfg["procs"] * TICK_S
            owed = 0.0
            nxt = time.time()
            pending: set[asyncio.Task[None]] = set()
            while nxt < end:
                owed += per_tick
                n = int(owed)
                owed -= n
                if n:
                    t = asyncio.ensure_future(send(n))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                nxt += TICK_S
                await asyncio.sleep(max(0.0, nxt - time.time()))
            if pending:
                await asyncio.wait(pending)
        # completions inside the window, sampled at its bounds
        done = worker.stats.succeeded
        await worker.stop(timeout=10)
        return {"lat_us": lat_us, "done": done, "counts": counts,
                "stats": {k: getattr(worker.stats, k) for k in ("polls", "empty_polls",
                                                                 "succeeded", "errors")}}




def thread_cpu(server_pid: int | None) -> dict[str, float]:
    """CPU seconds of the server's worker processes by kind of thread: `main` (the event
    loop: Python, grpc's calls into its core, the syscalls it makes), `slatedb` (SlateDB's
    runtime threads), `other` (grpc's poller, executors)."""
    out = {"main": 0.0, "slatedb": 0.0, "other": 0.0}
    for w in proc_children(server_pid) if server_pid else []:
        try:
            tids = os.listdir(f"/proc/{w}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{w}/task/{tid}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            name = data[data.index(b"(") + 1:data.rindex(b")")]
            fields = data[data.rindex(b")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            kind = ("main" if int(tid) == w else
                    "slatedb" if name.startswith(b"slatedb") else "other")
            out[kind] += cpu
    return out


SYSCALLS = ("sendmsg", "recvmsg", "write", "read", "writev", "readv", "epoll_wait",
            "epoll_pwait", "futex", "sendto", "recvfrom", "openat", "pwrite64", "fsync",
            "fdatasync", "rename", "getpid", "eventfd2", "clock_nanosleep", "poll",
            "ppoll", "sched_yield", "madvise", "mmap", "munmap")


def start_syscalls(server_pid: int | None, args: argparse.Namespace
                   ) -> subprocess.Popen[bytes] | None:
    """--syscalls: `perf stat` of syscall tracepoints over the server's worker processes
    for the window (counts, not samples: what the server asks of the kernel per job)."""
    if not args.syscalls or server_pid is None:
        return None
    pids = ",".join(str(w) for w in proc_children(server_pid))
    ev = ",".join(["raw_syscalls:sys_enter", "context-switches"]
                  + [f"syscalls:sys_enter_{n}" for n in SYSCALLS])
    return subprocess.Popen(["perf", "stat", "-x", ",", "-e", ev, "-p", pids, "--",
                             "sleep", str(args.duration)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def syscall_counts(proc: subprocess.Popen[bytes] | None) -> dict[str, float]:
    if proc is None:
        return {}
    _, err = proc.communicate(timeout=60)
    out: dict[str, float] = {}
    for line in err.decode().splitlines():
        parts = line.split(",")
        if len(parts) > 3 and parts[0].strip().isdigit():
            name = parts[2].rsplit("sys_enter_", 1)[-1].replace("raw_syscalls:sys_enter",
                                                                  "all")
            out[name] = float(parts[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit_counts(metrics_addr: str) -> tuple[float, float, float]:
    """(group commits, operations in them, calls relayed between worker processes) over
    the server, from its /metrics (worker processes publish there once a second)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    n = ops = relays = 0.0
    for line in text.splitlines():
        if line.startswith("silo_forwarded_calls_total{"):
            relays += float(line.rsplit(" ", 1)[1])
        if line.startswith("silo_commit_batch_operations_count"):
            n += float(line.rsplit(" ", 1)[1])
        elif line.startswith("silo_commit_batch_operations_sum"):
            ops += float(line.rsplit(" ", 1)[1])
    return n, ops, relays


def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    """The server's own CPU with nothing connected (SlateDB tickers, pollers, metrics)."""
    server = ServerProc(args)
    server.start()
    try:
        time.sleep(args.warmup + 1.0)
        cpu = CpuWindow(server.pid, [])
        cpu.start()
        time.sleep(args.duration)
        w = cpu.stop()
    finally:
        server.stop()
        server.cleanup()
    return {"scenario": "idle", "shards": shards_of(args), "cpu": w}


def run(args: argparse.Namespace, scenario: str, protocol: str) -> dict[str, Any]:
    if scenario == "idle":
        return run_idle(args)
    metrics_addr = f"127.0.0.1:{free_port()}"
    server = ServerProc(argparse.Namespace(
        **{**vars(args), "server_arg": ["--metrics-addr", metrics_addr, *args.server_arg]}))
    target = server.start()
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        t0 = time.time() + 3.0 + args.warmup  # spawn + warm-up before the window
        cfg = {"target": target, "tenants": args.tenants, "protocol": protocol,
               "scenario": scenario, "window": (t0, t0 + args.duration), "slots": args.slots,
               "backlog": args.backlog, "batch": args.batch, "enqueuers": args.enqueuers,
               "rate": args.rate, "procs": args.procs}
        procs = [ctx.Process(target=client_main, args=(i, cfg, q)) for i in range(args.procs)]
        for p in procs:
            p.start()
        cpu = CpuWindow(server.pid, [p.pid for p in procs if p.pid])
        time.sleep(max(0.0, t0 - time.time()))
        before = server_done(target, args)
        commits0 = commit_counts(metrics_addr)
        cpu.start()
        threads0 = thread_cpu(server.pid)
        spies = start_profiles(server.pid, args, f"{scenario}-{protocol}")
        sc = start_syscalls(server.pid, args)
        time.sleep(args.duration)
        w = cpu.stop()
        threads1 = thread_cpu(server.pid)
        syscalls = syscall_counts(sc)
        for s in spies:
            s.wait(timeout=60)
        after = server_done(target, args)
        commits1 = commit_counts(metrics_addr)
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        server.stop()
        server.cleanup()
    lat = [x for _, r in results for x in r["lat_us"]]
    jobs = after - before
    commits = commits1[0] - commits0[0]
    return {
        "scenario": scenario, "protocol": protocol, "tenants": args.tenants,
        "jobs_per_s": round(jobs / w["wall_s"], 1),
        "server_cpu_us_per_job": round(w["server_cpu_s"] / max(jobs, 1) * 1e6, 1),
        "enqueue_to_handler_start_ms": percentiles_ms(lat),
        "commits_per_s": round(commits / w["wall_s"], 1),
        "ops_per_commit": round((commits1[1] - commits0[1]) / max(commits, 1), 1),
        "commits_per_job": round(commits / max(jobs, 1), 2),
        "server_cpu_us_per_commit": round(w["server_cpu_s"] / max(commits, 1) * 1e6, 1),
        "relays_per_job": round((commits1[2] - commits0[2]) / max(jobs, 1), 2),
        "thread_cpu_us_per_job": {k: round((threads1[k] - threads0[k]) / max(jobs, 1) * 1e6, 1)
                                  for k in threads0},
        "syscalls_per_job": {k: round(v / max(jobs, 1), 3) for k, v in syscalls.items() if v},
        "cpu": w,
        "clients": [r["stats"] | r["counts"] for _, r in sorted(results)],
    }


def start_profiles(server_pid: int | None, args: argparse.Namespace, name: str
                   ) -> list[subprocess.Popen[bytes]]:
    """--profile DIR: one py-spy (native frames) per server worker process for the
    measured window, as speedscope files DIR/<scenario>-<protocol>-w<pid>.json. py-spy's
    own CPU is outside the server tree, so CPU per job stays comparable (a little high:
    sampling pauses the server)."""
    if server_pid is None:
        return []
    if args.perf:  # CPU samples of every thread (SlateDB's and grpc's too), native frames
        out = Path(args.perf)
        out.mkdir(parents=True, exist_ok=True)
        pids = ",".join(str(w) for w in proc_children(server_pid))
        return [subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", pids,
                                  "-o", str(out / f"{name}.perf.data"), "--", "sleep",
                                  str(int(args.duration))],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    if not args.profile:
        return []
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    native = ["--native"] if args.profile_native else []
    return [subprocess.Popen([spy, "record", "--pid", str(w), *native,
                              "--rate", str(args.profile_rate), "--duration", str(int(args.duration)),
                              "--format", "speedscope",
                              "--output", str(out / f"{name}-w{w}.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for w in proc_children(server_pid)]


def server_done(target: str, args: argparse.Namespace) -> int:
    """Completed jobs of every shard (GetNodeInfo), i.e. durable outcomes."""
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        info = pb_grpc.SiloStub(ch).GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    return sum(s.completed_jobs for s in info.owned_shards)


def verdict(v: float | None, target: float, higher: bool) -> str:
    if v is None:
        return ""
    ok = v >= target if higher else v <= target
    return f"[target {'≥' if higher else '≤'} {target:,.0f}: {'met' if ok else 'MISSED'}]"


def report(r: dict[str, Any]) -> None:
    c = r["cpu"]
    if r["scenario"] == "idle":
        print(f"== idle ({r['shards']} shards, nothing connected) " + "=" * 30)
        print(f"  server CPU              {c['server_cores']:.3f} cores, by process "
              + " + ".join(f"{x:.3f}" for x in c["server_cores_by_process"]))
        return
    lat = r["enqueue_to_handler_start_ms"]
    print(f"== {r['scenario']} / {r['protocol']} ({r['tenants']} tenants) " + "=" * 30)
    print(f"  completed jobs/s        {r['jobs_per_s']:,.1f}  "
          + (verdict(r["jobs_per_s"], TARGETS["jobs_per_s"], True)
             if r["scenario"] == "saturation" and r["protocol"] == "stream" else ""))
    print(f"  server CPU / job        {r['server_cpu_us_per_job']:,.1f} µs  "
          + (verdict(r["server_cpu_us_per_job"], TARGETS["server_cpu_us_per_job"], False)
             if r["protocol"] == "stream" else ""))
    print(f"  enqueue→handler start   p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
          f"max {lat['max']} ms  "
          + (verdict(lat["p50"], TARGETS["p50_ms"], False) + " "
             + verdict(lat["p99"], TARGETS["p99_ms"], False)
             if r["scenario"] == "steady" and r["protocol"] == "stream" else ""))
    print(f"  group commits           {r['commits_per_s']:,.1f}/s, {r['commits_per_job']} per job, "
          f"{r['ops_per_commit']} ops each, server CPU {r['server_cpu_us_per_commit']:,.0f} µs "
          "per commit")
    print(f"  relayed calls           {r['relays_per_job']} per job (between worker processes)")
    print("  server CPU / job by thread  " + ", ".join(
        f"{k} {v:,.1f} µs" for k, v in r["thread_cpu_us_per_job"].items()))
    if r["syscalls_per_job"]:
        print("  syscalls / job          " + ", ".join(
            f"{k} {v}" for k, v in sorted(r["syscalls_per_job"].items(),
                                          key=lambda kv: -kv[1])))
    print(f"  server CPU              {c['server_cores']:.2f} cores, by process "
          + " + ".join(f"{x:.2f}" for x in c["server_cores_by_process"]))
    print(f"  loadgen CPU             {c['loadgen_cores']:.2f} cores")
    print(f"  machine busy            {c['machine_busy_pct']:.1f} %   other busy CPU "
          f"{c['other_cpu_cores']:.2f} cores")
    print(f"  clients                 {r['clients']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--scenario", default="all", help="saturation,steady,idle or all "
                    "(= saturation,steady)")
    ap.add_argument("--protocol", default="stream,unary")
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=500.0, help="steady: jobs/s in total")
    ap.add_argument("--slots", type=int, default=256, help="worker concurrency per process")
    ap.add_argument("--backlog", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128, help="saturation: jobs per EnqueueMany")
    ap.add_argument("--enqueuers", type=int, default=2, help="saturation: per process")
    ap.add_argument("--profile", metavar="DIR",
                    help="py-spy --native each server worker over the window into DIR")
    ap.add_argument("--profile-rate", type=int, default=50, help="py-spy samples/s")
    ap.add_argument("--no-profile-native", dest="profile_native", action="store_false",
                    help="py-spy without --native: Python frames only, but each sample keeps "
                         "the Python stack of a task resumed from the event loop (with "
                         "--native those samples end in the loop's task_wakeup)")
    ap.add_argument("--perf", metavar="DIR",
                    help="instead of py-spy: `perf record -g` of the server's worker "
                         "processes over the window into DIR/<scenario>-<protocol>.perf.data "
                         "(then `perf report -i F --sort comm,dso -g none`)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the server's syscalls per job over the window (perf stat "
                         "of syscall tracepoints)")
    ap.add_argument("--tree", metavar="DIR",
                    help="run the server of another source tree (e.g. an export of the "
                         "commit before a change) for a before/after pair")
    add_server_args(ap)
    args = ap.parse_args(argv)
    scenarios = ["saturation", "steady"] if args.scenario == "all" else args.scenario.split(",")
    out = {"machine": machine_info(), "results": []}
    for s in scenarios:
        for p in (["-"] if s == "idle" else args.protocol.split(",")):
            r = run(args, s, p)
            report(r)
            out["results"].append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
