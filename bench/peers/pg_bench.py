#!/usr/bin/env python3
"""procrastinate (PostgreSQL) load driver: one client process of bench/peers/run.py.

    VENV/bin/python bench/peers/pg_bench.py --dsn postgresql://postgres@127.0.0.1:PORT/postgres
        --scenario enqueue|e2e [--slot 0] [--concurrency 64] [--workers 4]
        [--worker-concurrency 16] [--warmup 2] [--duration 10] [--run-id X]
    VENV/bin/python bench/peers/pg_bench.py --dsn ... --setup     # apply the schema, exit

Runs in the venv that bench/peers/setup.sh fills (procrastinate, psycopg, uvloop), not
in Silo's. Same workload as bench/load.py and bullmq_bench.mjs, same protocol with
run.py (one JSON object per stdout line): `ready` once connected; then one stdin line
with the start instant (wall-clock epoch seconds); `tick` with cumulative counters
once a second; `result` with the counts and latency samples (µs) of the window.

- `enqueue`: --concurrency loops, each awaiting `task.defer_async(...)` and sending the
  next at once. One defer is one INSERT through procrastinate's `procrastinate_defer_jobs`
  in autocommit: it returns after the COMMIT, durable with `synchronous_commit=on`.
- `e2e`: concurrency/2 such loops plus --workers procrastinate workers
  (`app.run_worker_async(concurrency=--worker-concurrency)`, LISTEN/NOTIFY on) whose
  task returns at once. A job is completed when procrastinate's `finish_job` (the
  UPDATE to `succeeded`) returned: the driver wraps `app.job_manager.finish_job` to
  see that moment.
- The connection pool has one connection per call the process can have in flight
  (procrastinate's default pool has 4), so the in-flight count reaches the server.
- Every loop stops issuing at the window's end and is bounded by --max-ops; workers
  are cancelled then (procrastinate's graceful stop); the process exits by itself at
  the latest --call-timeout + 10 s after the window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

ERROR_SLEEP_S = 0.05
PAD = "x" * 40
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Recorder:
    def __init__(self) -> None:
        self.win_start = float("inf")
        self.win_end = float("-inf")
        self.enq_ok = 0
        self.enq_ok_win = 0
        self.enq_lat_us: list[int] = []
        self.done_ok = 0
        self.done_ok_win = 0
        self.stale_done_win = 0
        self.e2e_lat_us: list[int] = []
        self.complete_lat_us: list[int] = []
        self.errors: Counter[str] = Counter()
        self.error_msgs: Counter[str] = Counter()
        self.err_total = 0

    def in_window(self, t: float) -> bool:
        return self.win_start <= t < self.win_end

    def error(self, op: str, exc: BaseException) -> None:
        self.errors[op] += 1
        key = f"{op}: {type(exc).__name__}: {str(exc)[:200]}"
        if key in self.error_msgs or len(self.error_msgs) < 20:
            self.error_msgs[key] += 1
        self.err_total += 1

    def result(self) -> dict[str, Any]:
        out = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.__dict__.items()}
        del out["win_start"], out["win_end"]
        return out


def pool_size(args: argparse.Namespace) -> int:
    if args.setup:
        return 2
    if args.pool_size > 0:
        return args.pool_size
    if args.scenario == "enqueue":
        return args.concurrency + 2
    # enqueuers + per worker: its running jobs' finish_job, its fetch, LISTEN, heartbeat
    return max(1, args.concurrency // 2) + args.workers * (args.worker_concurrency + 3)


async def show_settings(app: Any) -> dict[str, str]:
    out = {}
    async with app.connector.pool.connection() as conn:
        for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                     "max_connections", "shared_buffers"):
            cur = await conn.execute(f"SHOW {name}")
            out[name] = (await cur.fetchone())[0]
    return out


async def prefill(app: Any, n: int) -> None:
    """Give the table a history of `n` finished jobs, then VACUUM ANALYZE it.

    A fresh table has no planner statistics, and autovacuum (default naptime 1 min)
    gathers none during a short run: procrastinate's fetch query is then planned for
    an empty table. This gives it a history and statistics, as a queue in production
    has. (On this machine it changed nothing measurable; see bench/README.md.)
    """
    async with app.connector.pool.connection() as conn:
        await conn.set_autocommit(True)
        if n > 0:
            await conn.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)"
                " SELECT 'bench', 'bench', '{}'::jsonb, 'succeeded', 1"
                " FROM generate_series(1, %s)", (n,))
        await conn.execute("VACUUM ANALYZE procrastinate_jobs")


async def amain(args: argparse.Namespace, rec: Recorder, info: dict[str, Any]) -> int:
    import importlib.metadata as md

    import procrastinate
    from procrastinate import jobs as pjobs

    size = pool_size(args)
    connector = procrastinate.PsycopgConnector(conninfo=args.dsn, min_size=size, max_size=size)
    app = procrastinate.App(connector=connector)

    @app.task(name="bench", queue=args.queue)
    async def bench_task(**kwargs: Any) -> None:
        return None

    async with app.open_async():
        if args.setup:
            await app.schema_manager.apply_schema_async()
            await prefill(app, args.prefill)
            emit({"type": "ready", "slot": args.slot, "setup": True})
            return 0
        info.update(await show_settings(app))
        for dist in ("procrastinate", "psycopg", "psycopg-pool"):
            with contextlib.suppress(md.PackageNotFoundError):
                info[dist] = md.version(dist)
        info["pool_size"] = size

        run_id = args.run_id
        started: dict[int, float] = {}
        orig_finish = app.job_manager.finish_job

        async def finish_job(job: Any, status: Any, delete_job: bool) -> None:
            await orig_finish(job=job, status=status, delete_job=delete_job)
            t1 = time.time()
            t0 = started.pop(job.id, None)
            if status != pjobs.Status.SUCCEEDED:
                rec.error("job_" + str(status.value), RuntimeError(f"job {job.id} ended {status}"))
                return
            rec.done_ok += 1
            if not rec.in_window(t1):
                return
            rec.done_ok_win += 1
            if t0 is not None:
                rec.complete_lat_us.append(round((t1 - t0) * 1e6))
            kw = job.task_kwargs or {}
            if kw.get("run") == run_id and isinstance(kw.get("ts"), int):
                rec.e2e_lat_us.append(round(t1 * 1e6 - kw["ts"]))
            else:
                rec.stale_done_win += 1

        app.job_manager.finish_job = finish_job  # type: ignore[method-assign]

        async def track_start(call_next: Any, context: Any, worker: Any) -> Any:
            started[context.job.id] = time.time()
            return await call_next()

        emit({"type": "ready", "slot": args.slot, "info": info})
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        start = float(line)
        rec.win_start = start + args.warmup
        rec.win_end = rec.win_start + args.duration
        stop_at = rec.win_end
        # the process never outlives its window by more than call-timeout + 10 s
        signal.alarm(max(1, int(stop_at - time.time() + args.call_timeout + 10)))

        async def ticker() -> None:
            while True:
                await asyncio.sleep(1.0)
                emit({"type": "tick", "slot": args.slot, "enq": rec.enq_ok, "done": rec.done_ok,
                      "err": rec.err_total})

        async def enqueuer(n: int) -> None:
            i = 0
            while i < args.max_ops:
                t = time.time()
                if t >= stop_at:
                    break
                i += 1
                ts = time.time_ns() // 1000
                try:
                    await asyncio.wait_for(
                        bench_task.defer_async(run=run_id, p=args.slot, n=n, i=i, ts=ts, pad=PAD),
                        args.call_timeout)
                except Exception as e:
                    rec.error("defer", e)
                    await asyncio.sleep(ERROR_SLEEP_S)
                    continue
                t1 = time.time()
                rec.enq_ok += 1
                if rec.in_window(t1):
                    rec.enq_ok_win += 1
                    rec.enq_lat_us.append(round((t1 - t) * 1e6))

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(max(0.0, start - time.time()))
        n_enq = args.concurrency if args.scenario == "enqueue" else max(1, args.concurrency // 2)
        loops = [asyncio.ensure_future(enqueuer(n)) for n in range(n_enq)]
        workers = []
        if args.scenario == "e2e":
            workers = [asyncio.ensure_future(app.run_worker_async(
                queues=[args.queue], concurrency=args.worker_concurrency,
                name=f"bench-{args.slot}-{w}", install_signal_handlers=False,
                shutdown_graceful_timeout=args.call_timeout, worker_middleware=[track_start],
            )) for w in range(args.workers)]
        await asyncio.sleep(max(0.0, stop_at - time.time()))
        _, pending = await asyncio.wait(loops, timeout=args.call_timeout + 2)
        for p in pending:
            p.cancel()
        if pending:
            rec.errors["enqueue_loop_cancelled"] += len(pending)
        for w in workers:
            w.cancel()
        if workers:
            done, pending_w = await asyncio.wait(workers, timeout=args.call_timeout + 2)
            for w in done:
                if not w.cancelled() and w.exception() is not None:
                    rec.error("worker", w.exception())
            if pending_w:
                rec.errors["worker_not_stopped"] += len(pending_w)
        tick.cancel()
        emit({"type": "tick", "slot": args.slot, "enq": rec.enq_ok, "done": rec.done_ok,
              "err": rec.err_total})
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--setup", action="store_true",
                    help="apply procrastinate's schema, add --prefill finished jobs, ANALYZE, exit")
    ap.add_argument("--prefill", type=int, default=0,
                    help="with --setup: finished jobs to insert before VACUUM ANALYZE")
    ap.add_argument("--scenario", choices=("enqueue", "e2e"), default="enqueue")
    ap.add_argument("--slot", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--worker-concurrency", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--call-timeout", type=float, default=10.0)
    ap.add_argument("--max-ops", type=int, default=10_000_000)
    ap.add_argument("--run-id", default=f"r{os.getpid()}")
    ap.add_argument("--queue", default="bench")
    ap.add_argument("--pool-size", type=int, default=0,
                    help="connections per process; 0: one per call it can have in flight")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if urlsplit(args.dsn).hostname not in LOOPBACK:
        print("pg_bench: loopback targets only", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # run.py handles Ctrl-C and stops us
    rec = Recorder()
    info: dict[str, Any] = {"peer": "procrastinate", "python": sys.version.split()[0]}
    try:
        import uvloop

        runner = uvloop.run
        info["loop"] = "uvloop"
    except ImportError:
        runner = asyncio.run
        info["loop"] = "asyncio"
    rc = 0

    def hard_limit(signum: int, frame: Any) -> None:
        if not args.setup:
            emit({"type": "result", "slot": args.slot, "info": info, "hard_limit": True,
                  **rec.result()})
        os._exit(3)

    # until the start line: connecting and waiting for the others; then run.py's window
    signal.signal(signal.SIGALRM, hard_limit)
    signal.alarm(120)
    fatal = None
    try:
        rc = runner(amain(args, rec, info))
    except BaseException as e:
        fatal = f"{type(e).__name__}: {e}"
        rec.error("fatal", e)
        rc = 1
    signal.alarm(0)
    if not args.setup:
        res = {"type": "result", "slot": args.slot, "info": info, **rec.result()}
        if fatal:
            res["fatal"] = fatal
        emit(res)
    elif fatal:
        print(f"pg_bench --setup failed: {fatal}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
