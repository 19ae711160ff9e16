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
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

READY_RE = re.compile(r"silo serving on (\S+):(\d+)")
SERVER_READY_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 15.0
CLIENT_START_TIMEOUT_S = 60.0
ERROR_SLEEP_S = 0.05
EMPTY_POLL_SLEEP_S = 0.005
PRIORITY = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_WARN_CORES = 0.25

# grant-latency
GRANT_TENANT = "bench-grant"
GRANT_KEY = "bench-grant-slot"
GRANT_WAIT_S = 10.0  # a release not followed by a grant within this long is an error
# limited-throughput
TP_TENANTS = [f"bench-{i}" for i in range(4)]
TP_MAX_CONCURRENCY = 100
TP_LEASE_BATCH = 16

TARGETS = {
    "grant_p50_ms": 5.0,
    "grant_p99_ms": 25.0,
    "limited_pct_of_unlimited": 80.0,
}


# ---------------------------------------------------------------------------
# /proc: CPU of the server (and the worker processes it forks), clients, machine
# ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2:].split()  # the comm field may contain spaces
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # fields 14 and 15


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in threads:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def tree_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds of pid and every live descendant, by pid."""
    seen: dict[int, float] = {}
    todo = [pid] if pid else []
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        c = cpu_seconds(p)
        if c is not None:
            seen[p] = c
            todo += child_pids(p)
    return seen


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat (iowait counts as idle)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


class CpuSnap:
    """One reading of server tree, client processes and machine CPU."""

    def __init__(self, server_pid: int | None, client_pids: list[int]):
        self.t = time.monotonic()
        self.server = tree_cpu(server_pid)
        self.clients = sum(c for p in client_pids if (c := cpu_seconds(p)) is not None)
        self.machine = machine_jiffies()


def cpu_between(a: CpuSnap, b: CpuSnap) -> dict[str, Any]:
    secs = max(1e-9, b.t - a.t)
    srv = sum(b.server.values()) - sum(a.server.get(p, 0.0) for p in b.server)
    per_proc = sorted(((c - a.server.get(p, 0.0)) / secs for p, c in b.server.items()), reverse=True)
    cli = b.clients - a.clients
    busy = (b.machine[0] - a.machine[0]) / max(1, b.machine[1] - a.machine[1])
    ncpu = os.cpu_count() or 1
    return {
        "seconds": round(secs, 3),
        "server_cpu_s": round(srv, 3),
        "server_cpu_cores": round(srv / secs, 3),
        "server_cpu_cores_by_process": [round(x, 2) for x in per_proc if x >= 0.005],
        "loadgen_cpu_s": round(cli, 3),
        "loadgen_cpu_cores": round(cli / secs, 3),
        "machine_busy_pct": round(100 * busy, 1),
        # busy cores nobody here accounts for: other processes on the machine
        "other_cpu_cores": round(busy * ncpu - (srv + cli) / secs, 2),
    }


def busy_pct(seconds: float = 1.0) -> float:
    b0, t0 = machine_jiffies()
    time.sleep(seconds)
    b1, t1 = machine_jiffies()
    return round(100 * (b1 - b0) / max(1, t1 - t0), 1)


def machine_info() -> dict[str, Any]:
    import grpc

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    repo = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        return ""

    return {
        "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(), "grpcio": grpc.__version__,
        "silo_commit": git("rev-parse", "--short", "HEAD") or None,
        "silo_tree_dirty": bool(git("status", "--porcelain", "--", "silo")),
        "loadavg_at_start": os.getloadavg()[0],
        "busy_pct_before_start": busy_pct(),
    }


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def pcts_ms(samples_s: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max (nearest rank) of samples in seconds, as ms."""
    if not samples_s:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    s = sorted(samples_s)
    n = len(s)

    def rank(q: float) -> float:
        return round(1000 * s[min(n - 1, max(0, math.ceil(q * n) - 1))], 3)

    return {"n": n, "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
            "max": round(1000 * s[-1], 3), "mean": round(1000 * statistics.fmean(s), 3)}


def route(owners: list[tuple[str, str, str]], tenant: str) -> str:
    """The shard whose half-open [range_start, range_end) holds XXH64(tenant) ("" = open)."""
    import xxhash

    h = xxhash.xxh64_hexdigest(tenant.encode("utf-8"))
    for shard, lo, hi in owners:
        if (not lo or lo <= h) and (not hi or h < hi):
            return shard
    raise RuntimeError(f"no shard owns tenant {tenant!r} (hash {h})")


def topology(target: str) -> list[tuple[str, str, str]]:
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        info = pb_grpc.SiloStub(ch).GetClusterInfo(pb.GetClusterInfoRequest(), timeout=10)
    owners = sorted(((o.shard_id, o.range_start, o.range_end) for o in info.shard_owners),
                    key=lambda o: o[1])
    if not owners:
        raise RuntimeError("GetClusterInfo listed no shard")
    return owners


def rpc_error_key(rpc: str, exc: BaseException) -> tuple[str, str]:
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        code, msg = exc.code().name, exc.details() or ""
    else:
        code, msg = "CLIENT_" + type(exc).__name__, str(exc)
    return f"{rpc}:{code}", f"{rpc}:{code}: {msg[:200]}"


class Errors:
    def __init__(self) -> None:
        self.by_code: Counter[str] = Counter()
        self.msgs: Counter[str] = Counter()

    def add(self, rpc: str, exc: BaseException) -> None:
        code, msg = rpc_error_key(rpc, exc)
        self.by_code[code] += 1
        if msg in self.msgs or len(self.msgs) < 20:
            self.msgs[msg] += 1

    def dump(self) -> dict[str, Any]:
        return {"errors": dict(self.by_code), "error_messages": dict(self.msgs)}


async def open_stub(target: str) -> tuple[Any, Any]:
    import grpc

    from silo._proto import silo_pb2_grpc as pb_grpc

    ch = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    await asyncio.wait_for(ch.channel_ready(), timeout=15)
    return ch, pb_grpc.SiloStub(ch)


def client_entry(fn_name: str, *a: Any) -> None:
    """Body of every spawned client process: run one coroutine on a fresh uvloop loop and
    hand its result (or what killed it) to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    import uvloop

    result_q = a[-1]
    try:
        res = uvloop.run(globals()[fn_name](*a[:-1]))
    except BaseException as e:  # the parent must never wait for a silent child
        res = {"fatal": f"{type(e).__name__}: {e}"}
    result_q.put(res)


async def wait_event(ev: Any, timeout: float) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, ev.wait, timeout)


# ---------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------


class Server:
    """`silo serve --tenancy` on 127.0.0.1:0 with a temp data dir; log in the same dir."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="silo-bench-limits-"))
        self.log = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        silo = args.silo_bin or shutil.which("silo") or str(Path(sys.executable).parent / "silo")
        self.cmd = [silo, "serve", "--data-dir", str(self.tmp / "data"),
                    "--grpc-addr", "127.0.0.1:0",
                    "--flush-interval-ms", str(args.flush_interval_ms),
                    "--shards", str(args.shards), "--tenancy"]
        if args.processes:
            self.cmd += ["--processes", str(args.processes)]
        self.cmd += args.server_arg

    def start(self) -> str:
        with open(self.log, "wb") as log:
            # own session: Ctrl-C reaches only us, and we stop the server ourselves
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            m = READY_RE.search(self.text())
            if m:
                if m.group(1) not in ("127.0.0.1", "localhost"):
                    raise RuntimeError(f"server bound {m.group(1)}, expected 127.0.0.1")
                return f"127.0.0.1:{m.group(2)}"
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}) before ready:\n{self.tail()}")
            time.sleep(0.05)
        raise RuntimeError("server never logged its ready line:\n" + self.tail())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def shard_process(self) -> dict[str, str]:
        """shard id -> the worker process ("w0", "w1", ...) that opened it, from the log."""
        return {m.group(2): f"w{m.group(1)}" for m in
                re.finditer(r"^\[w(\d+)\].*?\bshard ([0-9a-f-]{36}) opened", self.text(), re.M)}

    def warnings(self) -> list[str]:
        return [ln for ln in self.text().splitlines()
                if re.search(r"\b(ERROR|WARNING|CRITICAL)\b|Traceback", ln)][:50]

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after 15 s; safe to call twice."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server pid {p.pid} ignored SIGTERM: SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=10)
        return p.returncode

    def cleanup(self) -> None:
        if not self.args.keep_data:
            shutil.rmtree(self.tmp, ignore_errors=True)


def with_server(args: argparse.Namespace, label: str, body: Any) -> dict[str, Any]:
    """Run body(server, target) against a fresh server; always stop it."""
    srv = Server(args)
    try:
        target = srv.start()
        print(f"[{label}] server pid {srv.pid} on {target}", file=sys.stderr, flush=True)
        try:
            res = body(srv, target)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            res = {"fatal": f"{type(e).__name__}: {e}"}
        res["server_alive_at_end"] = srv.alive()
        code = srv.stop()
        res["server_exit_code"] = code
        res["server_log_warnings"] = srv.warnings()
        if res.get("error_total") or "fatal" in res or code not in (0, None):
            res["server_stderr_tail"] = srv.tail(40)
        res["server_cmd"] = srv.cmd
        return res
    finally:
        srv.stop()
        srv.cleanup()


def spawn(ctx: Any, name: str, fn_name: str, *a: Any) -> Any:
    p = ctx.Process(target=client_entry, name=name, daemon=True, args=(fn_name, *a))
    p.start()
    return p


def reap(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


# ---------------------------------------------------------------------------
# grant-latency: client processes
# ---------------------------------------------------------------------------


async def grant_enqueuer(cfg: dict[str, Any], granted: Any, stop: Any, ready: Any,
                         go: Any) -> dict[str, Any]:
    """Keep `waiters` jobs parked behind the slot: enqueue one more for each grant."""
    from silo._proto import silo_pb2 as pb

    ch, stub = await open_stub(cfg["target"])
    errs = Errors()
    lat: list[float] = []
    limit = pb.Limit(concurrency=pb.ConcurrencyLimit(key=GRANT_KEY, max_concurrency=1))
    seq = 0

    async def enqueue_one() -> None:
        nonlocal seq
        req = pb.EnqueueRequest(shard=cfg["shard"], tenant=GRANT_TENANT, id=f"{cfg['run']}-{seq:07d}",
                                priority=PRIORITY, start_at_ms=int(time.time() * 1000),
                                payload=pb.SerializedBytes(msgpack=b"\x80"),
                                limits=[limit], task_group=cfg["group"])
        t = time.perf_counter()
        try:
            await stub.Enqueue(req, timeout=cfg["call_timeout"])
        except Exception as e:
            errs.add("Enqueue", e)
            await asyncio.sleep(ERROR_SLEEP_S)
            return  # the same seq is tried again
        lat.append(time.perf_counter() - t)
        seq += 1

    try:
        # one job takes the slot, `waiters` park behind it
        deadline = time.monotonic() + 60
        while seq < cfg["waiters"] + 1 and time.monotonic() < deadline:
            await enqueue_one()
        ready.set()
        if not await wait_event(go, 120):
            return {"fatal": "no start signal"}
        hard_end = time.monotonic() + cfg["max_seconds"]
        while not stop.value and time.monotonic() < hard_end:
            # strictly one Enqueue in flight: seq order = start-time order = job-id order
            if seq - granted.value < cfg["waiters"]:  # not yet leased = parked
                await enqueue_one()
            else:
                await asyncio.sleep(0.002)
        return {"enqueued": seq, "enqueue_latency_ms": pcts_ms(lat), **errs.dump()}
    finally:
        await ch.close(grace=1)


async def grant_worker(cfg: dict[str, Any], granted: Any, stop: Any, ready: Any,
                       go: Any) -> dict[str, Any]:
    """Hold the single slot, release it, poll for the next waiter; time release -> lease."""
    from silo._proto import silo_pb2 as pb

    ch, stub = await open_stub(cfg["target"])
    errs = Errors()
    res: dict[str, Any] = {"variants": {}}
    ok_bytes = pb.SerializedBytes(msgpack=b"\xc3")  # msgpack true
    expect_limit = pb.Limit(concurrency=pb.ConcurrencyLimit(key=GRANT_KEY, max_concurrency=1))
    violations: list[str] = []
    last_seq = -1

    def lease_req(variant: str) -> Any:
        r = pb.LeaseTasksRequest(worker_id=f"grant-{cfg['run']}", max_tasks=1, task_group=cfg["group"])
        if variant == "own-shard":
            r.shard = cfg["shard"]
        return r

    async def report(task: Any) -> float:
        req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id, success=ok_bytes,
                                      tenant_id=task.tenant_id)
        while True:
            t = time.perf_counter()
            try:
                await stub.ReportOutcome(req, timeout=cfg["call_timeout"])
                return time.perf_counter() - t
            except Exception as e:
                errs.add("ReportOutcome", e)
                if "lease not found" in str(e):
                    return 0.0
                await asyncio.sleep(ERROR_SLEEP_S)

    def check(task: Any) -> None:
        nonlocal last_seq
        try:
            seq = int(task.job_id.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            violations.append(f"unexpected job {task.job_id!r}")
            return
        if seq != last_seq + 1:
            violations.append(f"granted #{seq} after #{last_seq} (expected #{last_seq + 1})")
        last_seq = max(last_seq, seq)
        if task.tenant_id != GRANT_TENANT or list(task.limits) != [expect_limit]:
            violations.append(f"job #{seq}: tenant {task.tenant_id!r} / limits {list(task.limits)}")

    async def poll_until_task(req: Any) -> tuple[Any, int, float]:
        """Tight LeaseTasks loop (no sleep); (task, polls, seconds) or (None, polls, s)."""
        polls = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < GRANT_WAIT_S:
            polls += 1
            try:
                r = await stub.LeaseTasks(req, timeout=cfg["call_timeout"])
            except Exception as e:
                errs.add("LeaseTasks", e)
                await asyncio.sleep(ERROR_SLEEP_S)
                continue
            if len(r.tasks) > 1:
                violations.append(f"LeaseTasks(max_tasks=1) returned {len(r.tasks)} tasks")
                for extra in r.tasks[1:]:
                    await report(extra)
            if r.tasks:
                return r.tasks[0], polls, time.perf_counter() - t0
        return None, polls, time.perf_counter() - t0

    try:
        ready.set()
        if not await wait_event(go, 120):
            return {"fatal": "no start signal"}
        hard_end = time.monotonic() + cfg["max_seconds"]
        holding, _, _ = await poll_until_task(lease_req(cfg["variants"][0]))
        if holding is None:
            return {"fatal": f"the first job was not leasable within {GRANT_WAIT_S:.0f} s", **errs.dump()}
        check(holding)
        granted.value += 1
        for variant in cfg["variants"]:
            req = lease_req(variant)
            lat: list[float] = []
            polls_per: list[int] = []
            report_lat: list[float] = []
            empty_lat: list[float] = []
            over = 0
            total = cfg["warmup_cycles"] + cfg["cycles"]
            t_start = time.monotonic()
            for i in range(total):
                if time.monotonic() >= hard_end:
                    violations.append(f"{variant}: time cap reached after {i} cycles")
                    break
                # while the slot is held, nobody else may be granted
                try:
                    tc = time.perf_counter()
                    r = await stub.LeaseTasks(req, timeout=cfg["call_timeout"])
                    if i >= cfg["warmup_cycles"] and not r.tasks:
                        empty_lat.append(time.perf_counter() - tc)
                    if r.tasks:
                        over += len(r.tasks)
                        violations.append(f"{variant}: job {r.tasks[0].job_id} leased while"
                                          f" {holding.job_id} held the only slot")
                        for extra in r.tasks:
                            check(extra)
                            await report(extra)
                except Exception as e:
                    errs.add("LeaseTasks", e)
                rl = await report(holding)
                t_rel = time.perf_counter()  # the release is durable: ReportOutcome returned
                nxt, polls, _ = await poll_until_task(req)
                t_grant = time.perf_counter()
                if nxt is None:
                    violations.append(f"{variant}: no waiter leased within {GRANT_WAIT_S:.0f} s"
                                      f" of a release ({polls} polls)")
                    holding = None
                    break
                check(nxt)
                granted.value += 1
                holding = nxt
                if i >= cfg["warmup_cycles"]:
                    lat.append(t_grant - t_rel)
                    polls_per.append(polls)
                    report_lat.append(rl)
            secs = time.monotonic() - t_start
            res["variants"][variant] = {
                "cycles": len(lat), "seconds": round(secs, 2),
                "grant_latency_ms": pcts_ms(lat),
                "polls_per_grant_mean": round(statistics.fmean(polls_per), 2) if polls_per else None,
                "polls_per_grant_max": max(polls_per, default=None),
                "grants_on_first_poll_pct": (round(100 * sum(p == 1 for p in polls_per) / len(polls_per), 1)
                                             if polls_per else None),
                "report_latency_ms": pcts_ms(report_lat),
                "empty_lease_latency_ms": pcts_ms(empty_lat),
                "over_grants": over,
                "cycles_per_s": round((cfg["warmup_cycles"] + len(lat)) / secs, 1) if secs else None,
                "raw_latency_ms": [round(x * 1000, 3) for x in lat],
            }
            if holding is None:
                break
        if holding is not None:
            await report(holding)
        res["violations"] = violations
        return {**res, **errs.dump()}
    finally:
        stop.value = 1
        await ch.close(grace=1)


def run_grant_latency(args: argparse.Namespace, server: Server, target: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    owners = topology(target)
    shard = route(owners, GRANT_TENANT)
    variants = ["any-shard", "own-shard"] if args.grant_poll == "both" else [args.grant_poll]
    cfg = {
        "target": target, "shard": shard, "run": f"g{os.getpid():x}{int(time.time()) % 100000:x}",
        "group": "bench-grant", "waiters": args.waiters, "cycles": args.cycles,
        "warmup_cycles": args.warmup_cycles, "variants": variants,
        "call_timeout": args.call_timeout,
        "max_seconds": args.grant_max_seconds,
    }
    granted = ctx.RawValue("q", 0)
    stop = ctx.RawValue("b", 0)
    go = ctx.Event()
    ready_e, ready_w = ctx.Event(), ctx.Event()
    q_e, q_w = ctx.Queue(), ctx.Queue()
    procs = []
    try:
        procs.append(spawn(ctx, "grant-enqueuer", "grant_enqueuer", cfg, granted, stop, ready_e, go, q_e))
        procs.append(spawn(ctx, "grant-worker", "grant_worker", cfg, granted, stop, ready_w, go, q_w))
        for ev, who, q in ((ready_e, "enqueuer", q_e), (ready_w, "worker", q_w)):
            deadline = time.monotonic() + CLIENT_START_TIMEOUT_S
            while not ev.wait(0.2):
                if time.monotonic() > deadline or not q.empty():
                    early = q.get(timeout=1) if not q.empty() else {"fatal": "start timeout"}
                    raise RuntimeError(f"grant {who} did not start: {early.get('fatal')}")
        print(f"[grant-latency] {args.waiters} waiters parked on tenant {GRANT_TENANT!r} key"
              f" {GRANT_KEY!r} (shard {shard[:8]}); {args.warmup_cycles}+{args.cycles} cycles"
              f" per variant: {', '.join(variants)}", file=sys.stderr, flush=True)
        snap0 = CpuSnap(server.pid, [p.pid for p in procs])
        go.set()
        hard = time.monotonic() + args.grant_max_seconds + 2 * args.call_timeout + 20
        worker_res: dict[str, Any] | None = None
        last_print, last_n = time.monotonic(), 0
        while worker_res is None and time.monotonic() < hard:
            try:
                worker_res = q_w.get(timeout=1.0)
            except Exception:
                now = time.monotonic()
                n = granted.value
                print(f"[grant-latency] t={now - snap0.t:5.1f}s grants={n} ({(n - last_n) / (now - last_print):.0f}/s)"
                      f" server_alive={server.alive()}", file=sys.stderr, flush=True)
                last_print, last_n = now, n
        snap1 = CpuSnap(server.pid, [p.pid for p in procs])
        stop.value = 1
        try:
            enq_res = q_e.get(timeout=args.call_timeout + 10)
        except Exception:
            enq_res = {"fatal": "enqueuer gave no result"}
    finally:
        stop.value = 1
        reap(procs)
    if worker_res is None:
        worker_res = {"fatal": "worker gave no result in time"}
    errors = Counter(worker_res.get("errors") or {}) + Counter(enq_res.get("errors") or {})
    msgs = Counter(worker_res.get("error_messages") or {}) + Counter(enq_res.get("error_messages") or {})
    out: dict[str, Any] = {
        "tenant": GRANT_TENANT, "key": GRANT_KEY, "shard": shard,
        "shard_process": server.shard_process().get(shard), "waiters": args.waiters,
        "variants": worker_res.get("variants") or {},
        "violations": worker_res.get("violations") or [],
        "enqueued": enq_res.get("enqueued"),
        "enqueue_latency_ms": enq_res.get("enqueue_latency_ms"),
        "errors": dict(errors), "error_total": sum(errors.values()), "error_messages": dict(msgs),
        "cpu": cpu_between(snap0, snap1),
    }
    for who, r in (("worker", worker_res), ("enqueuer", enq_res)):
        if "fatal" in r:
            out.setdefault("client_fatal", {})[who] = r["fatal"]
    if out.get("client_fatal") and not out["variants"]:
        out["fatal"] = "; ".join(f"{k}: {v}" for k, v in out["client_fatal"].items())
    return out


# ---------------------------------------------------------------------------
# limited-throughput: client process
# ---------------------------------------------------------------------------

# shared counters per client process
C_ENQ, C_DONE, C_ERR, C_LEASE = range(4)
N_C = 4


async def tp_client(slot: int, cfg: dict[str, Any], counters: Any, inflight: Any, ready: Any,
                    go: Any, t0: Any) -> dict[str, Any]:
    import msgspec

    from silo._proto import silo_pb2 as pb

    # Several connections per process: the server's worker processes share the listening
    # port, so each connection lands on one of them; with few connections the placement
    # (all on one process or not) moves the figures more than what is measured.
    chans: list[Any] = []
    try:
        for _ in range(cfg["channels"]):
            chans.append(await open_stub(cfg["target"]))
    except Exception as e:
        ready.put((slot, f"{type(e).__name__}: {e}"))
        for ch, _ in chans:
            await ch.close(grace=1)
        raise
    stubs = [stub for _, stub in chans]
    errs = Errors()
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    routes: list[tuple[str, str]] = cfg["routes"]
    tenant_ix = {t: i for i, (_, t) in enumerate(routes)}
    nt = len(routes)
    limits = {t: ([pb.Limit(concurrency=pb.ConcurrencyLimit(key=f"{t}-queue",
                                                           max_concurrency=TP_MAX_CONCURRENCY))]
                  if cfg["limited"] else []) for _, t in routes}
    base = slot * N_C
    ibase = slot * nt
    st: Counter[str] = Counter()
    lat: dict[str, list[float]] = {"enqueue": [], "lease": [], "report": [], "e2e": []}
    peak = [0] * nt  # leased-and-unreported per tenant over all client processes, seen at lease time
    ok_bytes = pb.SerializedBytes(msgpack=enc.encode({"ok": True}))
    try:
        ready.put((slot, None))
        if not await wait_event(go, 120):
            return {"fatal": "no start signal"}
        start = t0.value
        win0, win1 = start + cfg["warmup"], start + cfg["warmup"] + cfg["duration"]
        mono = time.monotonic

        async def enqueuer(n: int) -> None:
            stub = stubs[n % len(stubs)]
            i = 0
            while mono() < win1 and i < cfg["max_ops"]:
                shard, tenant = routes[(slot + n + i) % nt]
                i += 1
                ts = time.time()
                req = pb.EnqueueRequest(shard=shard, tenant=tenant, priority=PRIORITY,
                                        start_at_ms=int(ts * 1000), task_group=cfg["group"],
                                        limits=limits[tenant],
                                        payload=pb.SerializedBytes(msgpack=enc.encode(
                                            {"run": cfg["run"], "ts": ts, "pad": "x" * 40})))
                t = mono()
                try:
                    await stub.Enqueue(req, timeout=cfg["call_timeout"])
                except Exception as e:
                    errs.add("Enqueue", e)
                    counters[base + C_ERR] += 1
                    await asyncio.sleep(ERROR_SLEEP_S)
                    continue
                t1 = mono()
                st["enq"] += 1
                counters[base + C_ENQ] += 1
                if win0 <= t1 < win1:
                    st["enq_win"] += 1
                    lat["enqueue"].append(t1 - t)

        async def report(stub: Any, task: Any) -> None:
            req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id, success=ok_bytes)
            if task.HasField("tenant_id"):
                req.tenant_id = task.tenant_id
            ti = tenant_ix.get(task.tenant_id)
            t = mono()
            try:
                await stub.ReportOutcome(req, timeout=cfg["call_timeout"])
            except Exception as e:
                errs.add("ReportOutcome", e)
                counters[base + C_ERR] += 1
                return
            finally:
                if ti is not None:
                    inflight[ibase + ti] -= 1
            t1 = mono()
            st["done"] += 1
            counters[base + C_DONE] += 1
            if win0 <= t1 < win1:
                st["done_win"] += 1
                lat["report"].append(t1 - t)
                with contextlib.suppress(Exception):
                    doc = dec.decode(task.payload.msgpack)
                    if doc.get("run") == cfg["run"]:
                        lat["e2e"].append(time.time() - doc["ts"])

        async def worker(n: int) -> None:
            stub = stubs[n % len(stubs)]
            req = pb.LeaseTasksRequest(worker_id=f"tp-{cfg['run']}-{slot}-{n}",
                                       max_tasks=TP_LEASE_BATCH, task_group=cfg["group"])
            i = 0
            while mono() < win1 and i < cfg["max_ops"]:
                i += 1
                t = mono()
                try:
                    r = await stub.LeaseTasks(req, timeout=cfg["call_timeout"])
                except Exception as e:
                    errs.add("LeaseTasks", e)
                    counters[base + C_ERR] += 1
                    await asyncio.sleep(ERROR_SLEEP_S)
                    continue
                t1 = mono()
                counters[base + C_LEASE] += 1
                if win0 <= t1 < win1:
                    st["lease_calls_win"] += 1
                    st["leased_win"] += len(r.tasks)
                    lat["lease"].append(t1 - t)
                    if not r.tasks:
                        st["lease_empty_win"] += 1
                if not r.tasks:
                    await asyncio.sleep(EMPTY_POLL_SLEEP_S)
                    continue
                for task in r.tasks:
                    ti = tenant_ix.get(task.tenant_id)
                    if ti is None:
                        st["foreign_tenant_tasks"] += 1
                        continue
                    inflight[ibase + ti] += 1
                for ti in range(nt):  # other processes' slots: torn reads are fine for a peak
                    cur = sum(inflight[s * nt + ti] for s in range(cfg["procs"]))
                    peak[ti] = max(peak[ti], cur)
                await asyncio.gather(*(report(stub, task) for task in r.tasks))

        delay = start - mono()
        if delay > 0:
            await asyncio.sleep(delay)
        coros = [enqueuer(n) for n in range(cfg["enqueuers"])] + [worker(n) for n in range(cfg["workers"])]
        tasks = [asyncio.ensure_future(c) for c in coros]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, win1 - mono()) + cfg["call_timeout"] + 5)
        for p in pending:
            p.cancel()
        if pending:
            st["loops_cancelled_at_hard_limit"] += len(pending)
            await asyncio.wait(pending, timeout=5)
        for tk in tasks:
            if tk.done() and not tk.cancelled() and tk.exception() is not None:
                errs.add("loop", tk.exception())
        return {"stats": dict(st), "lat_s": lat, "peak_inflight": peak, **errs.dump()}
    finally:
        for ch, _ in chans:
            await ch.close(grace=1)


def run_throughput(args: argparse.Namespace, server: Server, target: str, limited: bool,
                   label: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    owners = topology(target)
    routes = [(route(owners, t), t) for t in TP_TENANTS]
    cfg = {
        "target": target, "limited": limited, "routes": routes, "procs": args.procs,
        "group": "bench-tp", "run": f"t{os.getpid():x}{int(time.time() * 1000) % 10**8:x}",
        "enqueuers": max(1, args.concurrency // 2), "workers": args.workers,
        "warmup": args.warmup, "duration": args.duration, "call_timeout": args.call_timeout,
        "max_ops": args.max_ops, "channels": args.channels,
    }
    counters = ctx.RawArray("q", args.procs * N_C)
    inflight = ctx.RawArray("q", args.procs * len(routes))
    ready, results_q = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    t0 = ctx.RawValue("d", 0.0)
    procs: list[Any] = []
    results: list[dict[str, Any]] = []
    progress: list[dict[str, Any]] = []
    try:
        for i in range(args.procs):
            procs.append(spawn(ctx, f"tp-client-{i}", "tp_client", i, cfg, counters, inflight,
                               ready, go, t0, results_q))
        for _ in procs:
            slot, err = ready.get(timeout=CLIENT_START_TIMEOUT_S)
            if err:
                raise RuntimeError(f"client {slot} failed to start: {err}")
        start = time.monotonic() + 0.2
        t0.value = start
        go.set()
        win0, win1 = start + args.warmup, start + args.warmup + args.duration
        pids = [p.pid for p in procs]
        s0 = s1 = None
        tick = start + 1.0
        last = (start, [0] * N_C, sum(tree_cpu(server.pid).values()))
        while s1 is None:
            nxt = min(t for t in (tick, win0 if s0 is None else None, win1) if t is not None)
            time.sleep(max(0.0, nxt - time.monotonic()))
            now = time.monotonic()
            if s0 is None and now >= win0:
                s0 = CpuSnap(server.pid, pids)
            if now >= win1:
                s1 = CpuSnap(server.pid, pids)
            if now >= tick:
                tot = [sum(counters[s * N_C + k] for s in range(args.procs)) for k in range(N_C)]
                srv = sum(tree_cpu(server.pid).values())
                d = now - last[0]
                rate = [(a - b) / d for a, b in zip(tot, last[1], strict=True)]
                mid = now - d / 2
                phase = "warmup" if mid < win0 else "measure"
                cpu_pct = 100 * (srv - last[2]) / d
                print(f"[{label}] t={now - start:5.1f}s {phase:7s} enq/s={rate[C_ENQ]:6.0f}"
                      f" done/s={rate[C_DONE]:6.0f} lease/s={rate[C_LEASE]:5.0f} errors={tot[C_ERR]}"
                      f" server_cpu={cpu_pct:5.1f}%" + ("" if server.alive() else " SERVER EXITED"),
                      file=sys.stderr, flush=True)
                progress.append({"t": round(now - start, 2), "phase": phase,
                                 "enq_per_s": round(rate[C_ENQ], 1), "done_per_s": round(rate[C_DONE], 1),
                                 "errors_total": tot[C_ERR], "server_cpu_pct": round(cpu_pct, 1)})
                last = (now, tot, srv)
                tick += 1.0
        deadline = time.monotonic() + args.call_timeout + 20
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(results_q.get(timeout=max(0.1, deadline - time.monotonic())))
            except Exception:
                break
    finally:
        reap(procs)
    assert s0 is not None and s1 is not None
    cpu = cpu_between(s0, s1)
    window = cpu["seconds"]
    st: Counter[str] = Counter()
    lat: dict[str, list[float]] = {"enqueue": [], "lease": [], "report": [], "e2e": []}
    errors: Counter[str] = Counter()
    msgs: Counter[str] = Counter()
    fatal = []
    peak = [0] * len(routes)
    for r in results:
        if "fatal" in r:
            fatal.append(r["fatal"])
            continue
        st.update(r["stats"])
        errors.update(r["errors"])
        msgs.update(r["error_messages"])
        for k in lat:
            lat[k] += r["lat_s"][k]
        peak = [max(a, b) for a, b in zip(peak, r["peak_inflight"], strict=True)]
    done = st["done_win"]
    calls = st["lease_calls_win"]

    def per_job(cpu_s: float) -> float | None:
        return round(cpu_s * 1e6 / done, 1) if done else None

    out = {
        "limited": limited,
        "limit": f"<tenant>-queue max {TP_MAX_CONCURRENCY}" if limited else None,
        "tenants": {t: {"shard": s, "process": server.shard_process().get(s)} for s, t in routes},
        "window_s": window,
        "completed": done,
        "jobs_per_s": round(done / window, 1),
        "enqueue_per_s": round(st["enq_win"] / window, 1),
        "backlog_at_end": st["enq"] - st["done"],
        "lease_calls_per_s": round(calls / window, 1),
        "lease_empty_pct": round(100 * st["lease_empty_win"] / calls, 1) if calls else None,
        "tasks_per_lease": round(st["leased_win"] / calls, 2) if calls else None,
        "peak_inflight_per_tenant": dict(zip(TP_TENANTS, peak, strict=True)),
        "enqueue_latency_ms": pcts_ms(lat["enqueue"]),
        "lease_latency_ms": pcts_ms(lat["lease"]),
        "report_latency_ms": pcts_ms(lat["report"]),
        "e2e_latency_ms": pcts_ms(lat["e2e"]),
        "server_cpu_us_per_job": per_job(cpu["server_cpu_s"]),
        "loadgen_cpu_us_per_job": per_job(cpu["loadgen_cpu_s"]),
        "cpu": cpu,
        "errors": dict(errors), "error_total": sum(errors.values()), "error_messages": dict(msgs),
        "client_fatal": fatal, "clients_missing": len(procs) - len(results),
        "foreign_tenant_tasks": st["foreign_tenant_tasks"],
        "progress": progress,
    }
    if fatal and not done:
        out["fatal"] = "; ".join(fatal)
    return out


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
    ap.add_argument("--flush-interval-ms", type=int, default=10)
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
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--processes", type=int, default=0,
                    help="server worker processes (0 = silo's default, one per core)")
    ap.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each RPC, s")
    ap.add_argument("--max-ops", type=int, default=10_000_000, help="cap on each client loop's iterations")
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--silo-bin", help="silo executable (default: the one next to this python)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `silo serve` argument")
    ap.add_argument("--keep-data", action="store_true", help="keep the temp data dirs and server logs")
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
            "flush_interval_ms": args.flush_interval_ms, "shards": args.shards,
            "processes": args.processes, "procs": args.procs, "concurrency": args.concurrency,
            "workers": args.workers, "channels": args.channels, "duration_s": args.duration, "warmup_s": args.warmup,
            "repeat": args.repeat, "cycles": args.cycles, "warmup_cycles": args.warmup_cycles,
            "waiters": args.waiters, "grant_poll": args.grant_poll, "argv": sys.argv,
        },
        "targets": TARGETS,
        "scenarios": {},
    }

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
