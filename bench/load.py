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
import asyncio
import contextlib
import copy
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

READY_RE = re.compile(r"silo serving on (\S+):(\d+)")
DEFAULT_TENANT = "-"
TASK_GROUP = "bench"
PRIORITY = 50
LEASE_BATCH = 16
EMPTY_POLL_SLEEP_S = 0.005
ERROR_SLEEP_S = 0.05
SERVER_READY_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 15.0
OTHER_LOAD_WARN_CORES = 0.25
CLIENT_START_TIMEOUT_S = 60.0
FILL_MAX_ERRORS = 1000  # a pre-fill gives up after this many failed Enqueue calls per process
NOOP_SERVER = Path(__file__).resolve().parent / "noop_server.py"

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

# Targets of the foundation issue (2 cores, one server process, flush 10 ms).
TARGETS = {
    "enqueue_per_s": 3000.0,
    "e2e_jobs_per_s": 1200.0,
    "server_cpu_us_per_enqueue": 250.0,
    "server_cpu_us_per_job": 700.0,
}

# Shared counter slots per client process (read by the parent for progress and phases).
C_ENQ, C_DONE, C_ERR, C_LEASE, C_EMPTY, C_FILLED = range(6)
N_COUNTERS = 6

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# /proc helpers (no psutil)
# ---------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """utime+stime of one process (all its threads), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces/parens: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime, stime are fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return kids


def tree_cpu_by_pid(pid: int) -> dict[int, float]:
    """CPU seconds of a process and each of its live descendants, by pid ({} if gone)."""
    out: dict[int, float] = {}
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in out:
            continue
        c = proc_cpu_s(p)
        if c is not None:
            out[p] = c
            stack.extend(proc_children(p))
    return out


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and all its live descendants (a forking server counts whole)."""
    by_pid = tree_cpu_by_pid(pid)
    return sum(by_pid.values()) if pid in by_pid else None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])  # guest time is already included in user/nice
    return float(total - idle), float(total)


def machine_info() -> dict[str, Any]:
    import grpc

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = dirty = None
    with contextlib.suppress(Exception):
        repo = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "silo"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "silo_commit": commit,
        "silo_tree_dirty": dirty,  # uncommitted changes under silo/ when the run started
        "loadavg_at_start": os.getloadavg()[0],
        "busy_pct_before_start": idle_check(),
    }


def idle_check(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds` before the run: other load skews the figures."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    return round(100 * (b1 - b0) / max(1.0, t1 - t0), 1)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def percentiles_ms(samples_us: list[float]) -> dict[str, float | None]:
    keys = ("p50", "p90", "p99", "max")
    if not samples_us:
        return dict.fromkeys(keys)
    s = sorted(samples_us)
    n = len(s)

    def pick(q: float) -> float:
        # nearest rank
        i = max(0, min(n - 1, int(q * n + 0.999999) - 1))
        return round(s[i] / 1000.0, 3)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": round(s[-1] / 1000.0, 3)}


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


def xxh64_hex(tenant: str) -> str:
    import xxhash

    return f"{xxhash.xxh64_intdigest(tenant.encode('utf-8'), seed=0):016x}"


def shard_for(owners: list[tuple[str, str, str]], tenant: str) -> str:
    """Shard id whose [range_start, range_end) holds XXH64(tenant), as the client computes it."""
    key = xxh64_hex(tenant)
    for shard_id, start, end in owners:
        if (start == "" or start <= key) and (end == "" or key < end):
            return shard_id
    raise RuntimeError(f"no shard covers tenant {tenant!r} (hash {key})")


def fetch_topology(target: str, timeout: float = 10.0) -> list[tuple[str, str, str]]:
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        resp = pb_grpc.SiloStub(ch).GetClusterInfo(pb.GetClusterInfoRequest(), timeout=timeout)
    owners = [(o.shard_id, o.range_start, o.range_end) for o in resp.shard_owners if o.grpc_addr]
    owners.sort(key=lambda o: o[1])
    if not owners:
        raise RuntimeError("GetClusterInfo returned no owned shard")
    return owners


# ---------------------------------------------------------------------------
# client process
# ---------------------------------------------------------------------------


class Recorder:
    """Per-process results: counts, latencies inside the measured window, errors."""

    def __init__(self, counters: Any, slot: int, win_start: float, win_end: float):
        self.counters = counters
        self.base = slot * N_COUNTERS
        self.win_start = win_start
        self.win_end = win_end
        self.enq_ok = 0
        self.enq_ok_win = 0
        self.enq_lat_us: list[float] = []
        self.done_ok = 0
        self.done_ok_win = 0
        self.stale_done_win = 0  # completed tasks enqueued by someone else (earlier runs)
        self.e2e_lat_us: list[float] = []  # enqueue call -> its ReportOutcome returned OK
        self.pickup_lat_us: list[float] = []  # enqueue call -> a worker's LeaseTasks returned it
        self.report_lat_us: list[float] = []
        self.lease_calls = 0
        self.lease_calls_win = 0
        self.lease_empty = 0
        self.lease_empty_win = 0
        self.leased_tasks = 0
        self.leased_tasks_win = 0
        self.lease_lat_us: list[float] = []
        self.send_lag_us: list[float] = []  # steady: actual send time - scheduled send time
        self.sends_skipped = 0  # steady: sends dropped, --concurrency calls already in flight
        self.fill_ok = 0  # drain/fill: jobs enqueued by the pre-fill
        self.fill_s: float | None = None
        self.last_done_t: float | None = None  # time.monotonic() of the last OK ReportOutcome
        self.n_errors = 0
        self.errors: Counter[str] = Counter()
        self.error_msgs: Counter[str] = Counter()

    def in_window(self, t: float) -> bool:
        return self.win_start <= t < self.win_end

    def bump(self, idx: int, n: int = 1) -> None:
        self.counters[self.base + idx] += n

    def error(self, rpc: str, exc: BaseException) -> None:
        import grpc

        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code().name
            msg = exc.details() or ""
        else:
            code = "CLIENT_" + type(exc).__name__
            msg = str(exc)
        self.n_errors += 1
        self.errors[f"{rpc}:{code}"] += 1
        key = f"{rpc}:{code}: {msg[:200]}"
        if key in self.error_msgs or len(self.error_msgs) < 20:
            self.error_msgs[key] += 1
        self.bump(C_ERR)

    def result(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Counter) else v)
                for k, v in self.__dict__.items() if k not in ("counters", "base")}


def client_main(slot: int, cfg: dict[str, Any], shared: dict[str, Any], ready_q: Any,
                result_q: Any) -> None:
    """Entry point of one spawned client process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    import uvloop

    try:
        res = uvloop.run(client_async(slot, cfg, shared, ready_q))
    except BaseException as e:  # report anything, the parent must not hang
        res = {"fatal": f"{type(e).__name__}: {e}"}
        with contextlib.suppress(Exception):
            ready_q.put((slot, res["fatal"]))
    result_q.put((slot, res))


async def client_async(slot: int, cfg: dict[str, Any], shared: dict[str, Any],
                       ready_q: Any) -> dict[str, Any]:
    import grpc
    import msgspec

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    counters = shared["counters"]
    opts = [("grpc.max_send_message_length", 128 << 20),
            ("grpc.max_receive_message_length", 128 << 20)]
    channels = [grpc.aio.insecure_channel(cfg["target"], options=opts + [("grpc.use_local_subchannel_pool", 1)])
                for i in range(cfg["channels"])]
    stubs = [pb_grpc.SiloStub(ch) for ch in channels]
    call_timeout = cfg["call_timeout"]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), timeout=15)
        await stubs[0].GetClusterInfo(pb.GetClusterInfoRequest(), timeout=call_timeout)
        ready_q.put((slot, None))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, shared["go"].wait, 120):
            return {"fatal": "never got the start signal"}
        mode = cfg["mode"]
        nprocs = cfg["procs"]
        start = shared["t0"].value
        if mode in ("drain", "fill"):
            # the pre-fill is its own window; drain sets a new one when it starts
            stop_at = start + cfg["fill_timeout"]
            rec = Recorder(counters, slot, start, stop_at)
        else:
            win_start = start + cfg["warmup"]
            stop_at = win_start + cfg["duration"]
            rec = Recorder(counters, slot, win_start, stop_at)

        encoder = msgspec.msgpack.Encoder()
        decoder = msgspec.msgpack.Decoder()
        pad = "x" * 40
        run_id = cfg["run_id"]
        routes: list[tuple[str, str | None]] = cfg["routes"]  # (shard, tenant or None)
        max_ops = cfg["max_ops"]
        result_bytes = encoder.encode({"ok": True})
        mono = time.monotonic
        now_ns = time.time_ns
        rr = 0  # this process's position in the round-robin over routes (tenants)

        def total(idx: int) -> int:
            return sum(counters[s * N_COUNTERS + idx] for s in range(nprocs))

        async def enqueue_one(stub: Any, n: int, i: int) -> bool:
            """One Enqueue; the payload carries the wall-clock send time in µs."""
            nonlocal rr
            # processes interleave: process p takes routes p, p + procs, p + 2 procs, ...
            shard, tenant = routes[(slot + nprocs * rr) % len(routes)]
            rr += 1
            t = mono()
            ts = now_ns() // 1000
            payload = encoder.encode({"run": run_id, "p": slot, "n": n, "i": i, "ts": ts, "pad": pad})
            req = pb.EnqueueRequest(shard=shard, priority=PRIORITY, start_at_ms=ts // 1000,
                                    payload=pb.SerializedBytes(msgpack=payload),
                                    task_group=TASK_GROUP)
            if tenant is not None:
                req.tenant = tenant
            try:
                await stub.Enqueue(req, timeout=call_timeout)
            except Exception as e:  # count every failure by status code
                rec.error("Enqueue", e)
                return False
            t1 = mono()
            rec.enq_ok += 1
            rec.bump(C_ENQ)
            if rec.in_window(t1):
                rec.enq_ok_win += 1
                rec.enq_lat_us.append((t1 - t) * 1e6)
            return True

        async def enqueuer(n: int) -> None:
            """Closed loop: the next Enqueue as soon as the previous one returns."""
            stub = stubs[n % len(stubs)]
            i = 0
            while i < max_ops and mono() < stop_at:
                i += 1
                if not await enqueue_one(stub, n, i):
                    await asyncio.sleep(ERROR_SLEEP_S)

        fill_state = {"left": 0}

        async def filler(n: int) -> None:
            """Pre-fill: closed loop until this process's quota of OK enqueues is reached."""
            stub = stubs[n % len(stubs)]
            i = 0
            while (fill_state["left"] > 0 and i < max_ops and mono() < stop_at
                   and rec.n_errors < FILL_MAX_ERRORS):
                fill_state["left"] -= 1
                i += 1
                if not await enqueue_one(stub, n, i):
                    fill_state["left"] += 1  # try that one again
                    await asyncio.sleep(ERROR_SLEEP_S)

        async def pacer() -> None:
            """Open loop at --rate (this process's share): a send is due every
            procs/rate seconds whatever the previous calls are doing."""
            rate_p = cfg["rate"] / nprocs
            offset = slot / cfg["rate"]  # the processes' sends interleave
            cap = cfg["concurrency"]
            inflight: set[asyncio.Future[bool]] = set()
            k = 0
            while k < max_ops:
                due = start + offset + k / rate_p
                if due >= stop_at:
                    break
                d = due - mono()
                if d > 0:
                    await asyncio.sleep(d)
                k += 1
                t = mono()
                if rec.in_window(t):
                    rec.send_lag_us.append((t - due) * 1e6)
                if len(inflight) >= cap:
                    rec.sends_skipped += 1
                    continue
                fut = asyncio.ensure_future(enqueue_one(stubs[k % len(stubs)], 0, k))
                inflight.add(fut)
                fut.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.wait(inflight, timeout=call_timeout + 1)

        async def report(stub: Any, task: Any, ts: int | None) -> None:
            req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id,
                                          success=pb.SerializedBytes(msgpack=result_bytes))
            if task.HasField("tenant_id"):
                req.tenant_id = task.tenant_id
            t = mono()
            try:
                await stub.ReportOutcome(req, timeout=call_timeout)
            except Exception as e:
                rec.error("ReportOutcome", e)
                return
            t1 = mono()
            rec.done_ok += 1
            rec.last_done_t = t1
            rec.bump(C_DONE)
            if rec.in_window(t1):
                rec.done_ok_win += 1
                rec.report_lat_us.append((t1 - t) * 1e6)
                if ts is not None:
                    rec.e2e_lat_us.append(now_ns() / 1000 - ts)
                else:
                    rec.stale_done_win += 1

        def past_stop() -> bool:
            return mono() >= stop_at

        async def worker(n: int, should_stop: Any) -> None:
            """LeaseTasks(max 16) without a shard filter; ReportOutcome(success) for all
            leased tasks at once, then the next poll; 5 ms pause after an empty poll."""
            stub = stubs[n % len(stubs)]
            worker_id = f"bench-{run_id}-{slot}-{n}"
            req = pb.LeaseTasksRequest(worker_id=worker_id, max_tasks=LEASE_BATCH,
                                       task_group=TASK_GROUP)
            i = 0
            while i < max_ops and not should_stop():
                i += 1
                t = mono()
                try:
                    resp = await stub.LeaseTasks(req, timeout=call_timeout)
                except Exception as e:
                    rec.error("LeaseTasks", e)
                    await asyncio.sleep(ERROR_SLEEP_S)
                    continue
                t1 = mono()
                recv_us = now_ns() / 1000
                win = rec.in_window(t1)
                rec.lease_calls += 1
                rec.bump(C_LEASE)
                ntasks = len(resp.tasks)
                rec.leased_tasks += ntasks
                if win:
                    rec.lease_calls_win += 1
                    rec.leased_tasks_win += ntasks
                    rec.lease_lat_us.append((t1 - t) * 1e6)
                if ntasks == 0:
                    rec.lease_empty += 1
                    rec.bump(C_EMPTY)
                    if win:
                        rec.lease_empty_win += 1
                    await asyncio.sleep(EMPTY_POLL_SLEEP_S)
                    continue
                items = []
                for task in resp.tasks:
                    ts = None
                    with contextlib.suppress(Exception):
                        doc = decoder.decode(task.payload.msgpack)
                        if doc.get("run") == run_id:
                            ts = doc.get("ts")
                    if win and ts is not None:
                        rec.pickup_lat_us.append(recv_us - ts)
                    items.append((task, ts))
                await asyncio.gather(*(report(stub, task, ts) for task, ts in items))

        async def run_all(coros: list[Any]) -> None:
            """Run the loops; each stops issuing at stop_at, in-flight calls end by their
            deadline, and anything still running after that is cancelled."""
            hard_limit = max(0.0, stop_at - mono()) + call_timeout + 5
            tasks = [asyncio.ensure_future(c) for c in coros]
            if not tasks:
                return
            _, pending = await asyncio.wait(tasks, timeout=hard_limit)
            for p in pending:
                p.cancel()
            if pending:
                rec.errors["client_loop_cancelled_at_hard_limit"] += len(pending)
                await asyncio.wait(pending, timeout=5)
            for tk in tasks:
                if tk.done() and not tk.cancelled() and tk.exception() is not None:
                    rec.error("loop", tk.exception())

        delay = start - mono()
        if delay > 0:
            await asyncio.sleep(delay)
        if mode == "enqueue":
            await run_all([enqueuer(n) for n in range(cfg["concurrency"])])
        elif mode == "mixed":
            await run_all([enqueuer(n) for n in range(max(1, cfg["concurrency"] // 2))]
                          + [worker(n, past_stop) for n in range(cfg["workers"])])
        elif mode == "steady":
            await run_all([pacer()] + [worker(n, past_stop) for n in range(cfg["workers"])])
        else:  # drain / fill
            quota = cfg["quotas"][slot]
            fill_state["left"] = quota
            t_fill = mono()
            await run_all([filler(n) for n in range(min(cfg["concurrency"], quota))])
            rec.fill_ok = rec.enq_ok
            rec.fill_s = mono() - t_fill
            rec.bump(C_FILLED)
            if mode == "drain":
                if not await loop.run_in_executor(None, shared["go2"].wait, cfg["fill_timeout"] + 120):
                    return {"fatal": "never got the drain signal"}
                d0 = shared["t1"].value
                if d0 > 0:  # < 0: the parent gave up (pre-fill incomplete)
                    rec.win_start, rec.win_end = d0, d0 + cfg["drain_timeout"]
                    stop_at = rec.win_end
                    target = total(C_ENQ)  # every process has finished its pre-fill

                    def drained() -> bool:
                        return mono() >= stop_at or total(C_DONE) >= target

                    delay = d0 - mono()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await run_all([worker(n, drained) for n in range(cfg["workers"])])
        return rec.result()
    finally:
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close(grace=1)


# ---------------------------------------------------------------------------
# server management
# ---------------------------------------------------------------------------


def server_processes(args: argparse.Namespace) -> int:
    """Worker processes of a self-started `silo serve`, as it resolves --processes 0
    (one per core we may run on, at most one per shard); the no-op server gets as many."""
    n = args.processes or len(os.sched_getaffinity(0))
    return max(1, min(n, args.shards))


_interrupted = False  # a Ctrl-C / SIGTERM was held back while a server was being stopped


@contextlib.contextmanager
def defer_signals() -> Any:
    """Hold SIGINT/SIGTERM while stopping a server: a second Ctrl-C must not cut the
    stop short and leave the server (in its own session) running. main() then stops."""
    global _interrupted
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if held:
            _interrupted = True


class ServerProc:
    """A `silo serve` subprocess (or, kind "noop", bench/noop_server.py) on 127.0.0.1,
    port 0, with its log (and data dir) in a temp dir."""

    def __init__(self, args: argparse.Namespace, kind: str = "silo"):
        assert kind in ("silo", "noop")
        self.args = args
        self.kind = kind
        self.tmp = Path(tempfile.mkdtemp(prefix=f"silo-bench-{kind}-"))
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr: str | None = None
        self.exit_code: int | None = None
        self.starts = 0  # start() again after stop(): a restart on the same data dir
        self.poll_s = 0.05  # how often start() looks for the ready line
        self.spawn_t: float | None = None  # time.monotonic() just before the last spawn
        self.ready_t: float | None = None  # ... when its ready line was seen

    def command(self) -> list[str]:
        if self.kind == "noop":
            return [sys.executable, str(NOOP_SERVER), "--grpc-addr", "127.0.0.1:0",
                    "--processes", str(server_processes(self.args))]
        silo_bin = self.args.silo_bin or shutil.which("silo") or str(Path(sys.executable).parent / "silo")
        cmd = [silo_bin, "serve", "--data-dir", str(self.tmp / "data"),
               "--grpc-addr", "127.0.0.1:0",
               "--flush-interval-ms", str(self.args.flush_interval_ms),
               "--shards", str(self.args.shards)]
        cmd.append("--tenancy" if self.args.tenants > 0 else "--no-tenancy")
        if self.args.processes:
            cmd += ["--processes", str(self.args.processes)]
        return cmd + self.args.server_arg

    def start(self, ready_timeout: float = SERVER_READY_TIMEOUT_S) -> str:
        """Spawn the server and wait for its ready line. Called again after stop(), it
        restarts the same command on the same data dir (a new log file per start)."""
        if self.alive():
            raise RuntimeError("server already running")
        cmd = self.command()
        self.cmd = cmd
        self.starts += 1
        self.log_path = self.tmp / ("server.log" if self.starts == 1 else f"server.{self.starts}.log")
        self.exit_code = None
        self.ready_t = None
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed right below; the child keeps its fd
        try:
            self.spawn_t = time.monotonic()
            # Own session: a Ctrl-C in the terminal reaches only us; we stop the server ourselves.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            m = READY_RE.search(self.log_text())
            if m:
                self.ready_t = time.monotonic()
                host, port = m.group(1), m.group(2)
                if host not in ("127.0.0.1", "localhost"):
                    raise RuntimeError(f"server bound {host}, expected 127.0.0.1")
                self.addr = f"127.0.0.1:{port}"
                return self.addr
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} before ready:\n"
                                   + self.tail())
            time.sleep(self.poll_s)
        raise RuntimeError("server did not log its ready line in time:\n" + self.tail())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s. Safe to call more than once. A Ctrl-C or
        SIGTERM arriving meanwhile is held until the server is gone (see defer_signals)."""
        with defer_signals():
            return self._stop()

    def _stop(self) -> int | None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server pid {p.pid} ignored SIGTERM for {SERVER_STOP_TIMEOUT_S:.0f} s: SIGKILL",
                      file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=10)
        if p is not None:
            self.exit_code = p.returncode
        return self.exit_code

    def cleanup(self) -> None:
        if not self.args.keep_data:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [i for i in range(len(procs)) if i not in results]
    out = summarize(name, mode, args, results, missing, s_begin, s_end or snap(), prog.rows, server, extra)
    if "fatal" in extra:
        out["fatal"] = extra["fatal"]
    return out


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
    ap.add_argument("--flush-interval-ms", type=int, default=10)
    ap.add_argument("--shards", type=int, default=8, help="shards of a self-started server")
    ap.add_argument("--processes", type=int, default=0,
                    help="worker processes of the self-started server and of the no-op baseline"
                         " (0 = silo's default: one per core, at most one per shard)")
    ap.add_argument("--tenants", type=int, default=0,
                    help="scenarios other than `tenants`: spread over N tenants (self-started"
                         " server gets --tenancy); 0 = none")
    ap.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each RPC, s")
    ap.add_argument("--max-ops", type=int, default=10_000_000,
                    help="safety cap on iterations of each client loop")
    ap.add_argument("--baseline", action="store_true",
                    help="after each scenario, run it again against bench/noop_server.py"
                         " (no storage) and report ours as a share of that")
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--silo-bin", help="silo executable (default: the one next to this python)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `silo serve` (repeatable), e.g. --server-arg=--log-level=warning")
    ap.add_argument("--keep-data", action="store_true", help="keep the temp data dir and server log")
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
            "duration_s": args.duration, "warmup_s": args.warmup, "shards": args.shards,
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

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    rc = 0
    try:
        for name in args.scenarios:
            res = run_against(name, args, "silo", report)
            report["scenarios"][name] = res
            if failed(res):
                rc = 1
            if _interrupted:
                raise KeyboardInterrupt
            if args.baseline:
                noop = run_against(name, args, "noop", report)
                res["baseline"] = noop
                res["vs_baseline"] = compare_baseline(name, res, noop)
                if failed(noop):
                    rc = 1
                if _interrupted:
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
