"""bench/load.py's client processes: each runs its enqueuers and workers on its own
uvloop and grpc.aio channel and records counts and latencies inside the window."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from typing import Any

DEFAULT_TENANT = "-"
TASK_GROUP = "bench"
PRIORITY = 50
LEASE_BATCH = 16
EMPTY_POLL_SLEEP_S = 0.005
ERROR_SLEEP_S = 0.05
CLIENT_START_TIMEOUT_S = 60.0
FILL_MAX_ERRORS = 1000  # a pre-fill gives up after this many failed Enqueue calls per process

C_ENQ, C_DONE, C_ERR, C_LEASE, C_EMPTY, C_FILLED = range(6)
N_COUNTERS = 6

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


# Targets of the foundation issue (2 cores, one server process, flush 10 ms).
TARGETS = {
    "enqueue_per_s": 3000.0,
    "e2e_jobs_per_s": 1200.0,
    "server_cpu_us_per_enqueue": 250.0,
    "server_cpu_us_per_job": 700.0,
}
