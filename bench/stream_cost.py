#!/usr/bin/env python3
"""The server side of the stream protocol, in one process without a network: EnqueueMany
and one worker stream (silo.rpc.work_session) over the exact code `silo serve` runs for
them, against the shards of one worker process; a simulated worker answers every pushed
task with a success outcome and gives its slot back once the outcome is acked, as
silo.worker does.

    PYTHONPATH=. .venv/bin/python bench/stream_cost.py [--jobs 20000] [--shards 2]
        [--batch 128] [--slots 256] [--backlog 4000] [--store file|memory]

grpcio's own cost per message is not in it (the stream's context is a fake that hands
messages over in memory), nor the hop between worker processes: what is left is what
our code does per job. Reported per job: process CPU (the event loop and SlateDB's
threads), main-thread CPU, messages each way, keys written. For an instruction count
that does not move with the load of a shared box, run it under callgrind twice and
subtract (start-up, warm-up and shutdown cancel out):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/a.out \\
        .venv/bin/python bench/stream_cost.py --jobs 2000 --store memory
    ... --jobs 6000 ...   # (Ir(6000) - Ir(2000)) / 4000 = instructions per job
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from silo._proto import silo_pb2 as pb  # noqa: E402
from silo._proto import silo_stream_pb2 as spb  # noqa: E402
from silo.cluster.shardmap import ShardMap  # noqa: E402
from silo.rpc import stream  # noqa: E402
from silo.rpc.service import SiloService  # noqa: E402
from silo.rpc.work_session import WorkSession  # noqa: E402
from silo.runtime.node import Node  # noqa: E402
from silo.shard.state import ShardConfig  # noqa: E402

GROUP = "bench-stream"
TENANTS = [f"tenant-{i}" for i in range(16)]


class _Context:
    """The parts of grpc.aio.ServicerContext a worker stream uses; its writes go to the
    simulated worker, its reads come from it."""

    def __init__(self, on_down) -> None:
        self.up: asyncio.Queue[spb.WorkerUp | object] = asyncio.Queue()
        self.on_down = on_down
        self.down = 0

    async def read(self):
        return await self.up.get()

    async def write(self, msg: spb.WorkerDown) -> None:
        # what grpcio does with it: encode it (the worker decodes its copy)
        self.down += 1
        self.on_down(spb.WorkerDown.FromString(msg.SerializeToString()))

    async def abort(self, code, details=""):
        raise RuntimeError(f"stream aborted: {code} {details}")

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None


class _Worker:
    """silo.worker over silo.client.stream, reduced to its messages: each pushed task is
    answered with a success outcome; its slot goes back once the outcome's ack comes.
    Everything it sends in one loop pass goes up as one message, as WorkStream does."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.up = spb.WorkerUp()
        self.scheduled = False
        self.done = 0
        self.up_msgs = 0
        self.changed = asyncio.Event()

    def on_down(self, msg: spb.WorkerDown) -> None:
        for t in msg.tasks:
            r = self.up.outcomes.add(shard=t.shard, task_id=t.id)
            r.success.msgpack = b"\xc0"
            if t.HasField("tenant_id"):
                r.tenant_id = t.tenant_id
        n = 0
        for a in msg.acks:
            if a.kind == spb.Ack.OUTCOME:
                n += 1
        if n:
            self.done += n
            self.up.add_slots += n
            self.changed.set()
        if msg.tasks or n:
            self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        msg, self.up = self.up, spb.WorkerUp()
        self.up_msgs += 1
        self.ctx.up.put_nowait(spb.WorkerUp.FromString(msg.SerializeToString()))


async def run(args: argparse.Namespace) -> dict:
    from silo.runtime.server import tune_gc

    tmp = tempfile.mkdtemp(prefix="silo-stream-cost-")
    store = "memory:///" if args.store == "memory" else f"file://{tmp}"
    smap = ShardMap.create(args.shards)
    node = Node(smap, store, ShardConfig(flush_interval_ms=10, write_timeout_ms=3_600_000,
                                          lease_ms=3_600_000,
                                          flush_on_commit=getattr(args, "flush_on_commit", False)), tenancy=True,
                dev_mode=False, advertised_addr="127.0.0.1:1", reaper_interval_ms=60_000)
    await node.open()
    svc = SiloService(node)
    shard_of = {t: smap.shard_for_tenant(t).shard_id for t in TENANTS}
    ctx = _Context(lambda m: worker.on_down(m))
    worker = _Worker(ctx)
    first = spb.WorkerUp()
    first.subscribe.worker_id = "w"
    first.subscribe.task_group = GROUP
    first.subscribe.slots = args.slots
    ctx.up.put_nowait(first)
    session = asyncio.ensure_future(WorkSession(svc, ctx).run())
    enqueued = 0
    i = 0

    def jobs(n: int) -> list[pb.EnqueueRequest]:
        nonlocal i
        out = []
        for _ in range(n):
            t = TENANTS[i % len(TENANTS)]
            i += 1
            j = pb.EnqueueRequest(shard=shard_of[t], task_group=GROUP, priority=50,
                                  start_at_ms=int(time.time() * 1000), tenant=t,
                                  metadata={"t": repr(time.time())})
            j.payload.msgpack = b"\xc0"
            out.append(j)
        # what grpcio hands the handler: a parsed request
        req = spb.EnqueueManyRequest(jobs=out)
        return list(spb.EnqueueManyRequest.FromString(req.SerializeToString()).jobs)

    async def enqueuer(total: int) -> None:
        nonlocal enqueued
        while enqueued < total:
            while enqueued - worker.done > args.backlog:
                worker.changed.clear()
                await worker.changed.wait()
            n = min(args.batch, total - enqueued)
            enqueued += n
            resp = await stream.enqueue_many(svc, jobs(n))
            resp.SerializeToString()
            bad = [r for r in resp.results if r.WhichOneof("result") != "id"]
            if bad:
                raise RuntimeError(f"enqueue failed: {bad[0]}")

    async def until_done(total: int) -> None:
        while worker.done < total:
            worker.changed.clear()
            await worker.changed.wait()

    async def phase(total: int) -> None:
        await asyncio.gather(*(enqueuer(total) for _ in range(args.enqueuers)),
                             until_done(total))

    threshold = gc.get_threshold()
    tune_gc()
    try:
        return await _measure(args, node, ctx, worker, session, phase)
    finally:
        gc.unfreeze()  # as it was: the caller may be a test process
        gc.set_threshold(*threshold)


_KIND_NAMES = {0x01: "job info", 0x02: "job status", 0x03: "status index",
               0x04: "metadata index", 0x05: "task", 0x06: "lease", 0x07: "attempt",
               0x0E: "pending pointer", 0x10: "group time index",
               0x11: "metadata time index", 0xF0: "shard counter",
               0xF8: "tenant status counter", 0xF9: "tenant counts"}


class _KeyTally:
    """Every key a committer hands to SlateDB, by kind: puts, deletes, bytes (key +
    value), and deletes of keys no earlier batch wrote (they never reached storage).
    Wraps the committers' fill (bench only: nothing of it runs in the server)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], list[int]] = {}
        self.written: set[bytes] = set()
        self.on = False

    def wrap(self, committer) -> None:
        fill = committer._fill

        def counted(wb, writes):
            if self.on:
                for k, v in writes.items():
                    if v is None:
                        op = "delete" if k in self.written else "delete (never written)"
                        self.written.discard(k)
                    else:
                        op = "put"
                        self.written.add(k)
                    r = self.rows.setdefault((k[0], op), [0, 0, 0])
                    r[0] += 1
                    r[1] += len(k)
                    r[2] += 0 if v is None else len(v)
            else:
                for k, v in writes.items():
                    if v is None:
                        self.written.discard(k)
                    else:
                        self.written.add(k)
            fill(wb, writes)

        committer._fill = counted

    def table(self, jobs: int) -> str:
        out = ["| kind | op | per job | key B | value B | B per job |", "|---|---|---|---|---|---|"]
        tk = tb = 0.0
        for (kind, op), (n, kb, vb) in sorted(self.rows.items()):
            tk += n / jobs
            tb += (kb + vb) / jobs
            out.append(f"| 0x{kind:02X} {_KIND_NAMES.get(kind, '?')} | {op} | {n / jobs:.3f} "
                       f"| {kb / n:.1f} | {vb / n:.1f} | {(kb + vb) / jobs:.1f} |")
        out.append(f"| total | | {tk:.2f} | | | {tb:.0f} |")
        return "\n".join(out)


async def _measure(args, node, ctx, worker, session, phase) -> dict:
    tally = None
    if getattr(args, "keys", False):
        tally = _KeyTally()
        for s in node.shards.values():
            tally.wrap(s.committer)
    await phase(args.warmup)
    if tally is not None:
        tally.on = True
    committers = [s.committer for s in node.shards.values()]
    b0 = sum(c.batches_written for c in committers)
    o0 = sum(c.ops_written for c in committers)
    d0, u0 = ctx.down, worker.up_msgs
    p0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
    await phase(args.warmup + args.jobs)
    p1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
    n = args.jobs
    out = {
        "jobs": n,
        "cpu_us_per_job": round((p1 - p0) / n * 1e6, 1),
        "main_thread_us_per_job": round((t1 - t0) / n * 1e6, 1),
        "wall_us_per_job": round((w1 - w0) / n * 1e6, 1),
        "commits_per_job": round((sum(c.batches_written for c in committers) - b0) / n, 3),
        "ops_per_commit": round((sum(c.ops_written for c in committers) - o0)
                                / max(1, sum(c.batches_written for c in committers) - b0), 1),
        "down_msgs_per_job": round((ctx.down - d0) / n, 3),
        "up_msgs_per_job": round((worker.up_msgs - u0) / n, 3),
    }
    if tally is not None:
        tally.on = False
        out["keys"] = "\n" + tally.table(n)
    ctx.up.put_nowait(grpc.aio.EOF)
    await session
    await node.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--enqueuers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--backlog", type=int, default=8000)
    ap.add_argument("--store", choices=("file", "memory"), default="file")
    ap.add_argument("--flush-on-commit", action="store_true",
                    help="as `silo serve` (each commit flushes the WAL: smaller batches)")
    ap.add_argument("--keys", action="store_true",
                    help="tally the keys and bytes written per job, by kind (slower)")
    args = ap.parse_args(argv)
    import uvloop

    r = uvloop.run(run(args))
    print("  ".join(f"{k} {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
