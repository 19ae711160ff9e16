#!/usr/bin/env python3
"""The server side of one compatible unary call, in one process without a network:
Enqueue and GetJob through the exact handler chain `silo serve` registers (admission,
`instrument_rpc`, the `rpc` wrapper, parse, shard op, reply), against one shard.

    PYTHONPATH=. .venv/bin/python bench/unary_cost.py [--calls 20000] [--concurrency 128]
        [--method Enqueue,GetJob] [--store file|memory]

grpcio's own cost per call is the same before and after a change of ours, so this leaves
it out and measures what we control, load-independently enough to compare two trees on
a busy box (`--tree` is not needed: run it in each checkout). Calls go in rounds of
`--concurrency` at once (as h2load's 8 connections x 16 streams), so they share group
commits as on the server. Reported per call: process CPU (the event loop and SlateDB's
threads), main-thread CPU, time in the cyclic garbage collector and its collections
per 1,000 calls. The server's GC tuning (`tune_gc`) is applied first.

For an instruction count that does not depend on the box at all, run it under callgrind
twice and subtract (the start-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/a.out \
        .venv/bin/python bench/unary_cost.py --calls 1000 --store memory --method Enqueue
    ... --calls 3000 ...   # (Ir(3000) - Ir(1000)) / 2000 = instructions per call
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

from silo._proto import silo_pb2 as pb  # noqa: E402
from silo.cluster.shardmap import ShardMap  # noqa: E402
from silo.rpc.admission import guard_dispatch, process_admission  # noqa: E402
from silo.rpc.server import _behind_admission  # noqa: E402
from silo.rpc.service import SiloService  # noqa: E402
from silo.runtime.forward import Forwarded  # noqa: E402
from silo.runtime.node import Node  # noqa: E402
from silo.shard.state import ShardConfig  # noqa: E402

_REPLY = {"Enqueue": "EnqueueResponse", "GetJob": "GetJobResponse",
          "LeaseTasks": "LeaseTasksResponse", "ReportOutcome": "ReportOutcomeResponse"}

# What grpcio hands a handler for an h2load call (h2load's own headers).
_METADATA = (("user-agent", "h2load nghttp2/1.52.0"), ("te", "trailers"))


class _Context:
    """The parts of grpc.aio.ServicerContext the unary handlers use."""

    def invocation_metadata(self):
        return _METADATA

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, md) -> None:
        pass

    async def abort(self, code, details=""):
        raise RuntimeError(f"call failed: {code} {details}")


class _GcClock:
    """Time spent in the cyclic collector, from gc.callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.collections[info["generation"]] += 1


async def run(args: argparse.Namespace) -> dict:
    from silo.runtime.server import tune_gc

    tmp = tempfile.mkdtemp(prefix="silo-unary-cost-")
    store = "memory:///" if args.store == "memory" else f"file://{tmp}"
    node = Node(ShardMap.create(1), store, ShardConfig(), tenancy=False, dev_mode=False,
                advertised_addr="127.0.0.1:1", reaper_interval_ms=60_000)
    await node.open()
    service = SiloService(node)
    admission = process_admission(64 << 20)
    shard_id = next(iter(node.shards))
    enq = pb.EnqueueRequest(shard=shard_id, task_group="h2load", priority=50,
                            payload=pb.SerializedBytes(msgpack=b"\x81\xa1i\x01"))
    ctx = _Context()
    handlers = {m: _behind_admission(m, getattr(service, m), service, admission)
                for m in ("Enqueue", "GetJob", "LeaseTasks", "ReportOutcome")}
    if getattr(args, "forwarded", False):  # the owner's side of a forwarded call: what the peer socket runs
        guarded = guard_dispatch(service.dispatch, admission)
        meta = Forwarded("", 0.0)

        def as_forwarded(m: str):
            async def call(body: bytes, _ctx):
                code, message, _, out = await guarded(m, body, meta)
                if code:
                    raise RuntimeError(f"call failed: {code} {message}")
                return getattr(pb, _REPLY[m]).FromString(out)
            return call

        handlers = {m: as_forwarded(m) for m in handlers}
    first = await handlers["Enqueue"](enq.SerializeToString(), ctx)
    bodies = {"Enqueue": enq.SerializeToString(),
              "GetJob": pb.GetJobRequest(shard=shard_id, id=first.id).SerializeToString()}
    lease_body = pb.LeaseTasksRequest(worker_id="w", max_tasks=16,
                                      task_group="h2load").SerializeToString()

    async def job_round(n: int) -> None:
        """n jobs through the unary API as load.py's saturation drives them: n Enqueues
        at once, LeaseTasks of 16 until all are leased, then n ReportOutcome(success)."""
        enqueue, lease_tasks = handlers["Enqueue"], handlers["LeaseTasks"]
        report = handlers["ReportOutcome"]
        await asyncio.gather(*(enqueue(bodies["Enqueue"], ctx) for _ in range(n)))
        tasks: list = []
        while len(tasks) < n:
            got = await asyncio.gather(*(lease_tasks(lease_body, ctx)
                                         for _ in range(-(-(n - len(tasks)) // 16))))
            tasks += [t for r in got for t in r.tasks]
        await asyncio.gather(*(report(pb.ReportOutcomeRequest(
            shard=t.shard, task_id=t.id, success=pb.SerializedBytes(msgpack=b"\xc0"))
            .SerializeToString(), ctx) for t in tasks))
    threshold = gc.get_threshold()
    tune_gc()
    out: dict = {}
    try:
        for method in args.method.split(","):
            if method == "Job":
                async def one_round() -> None:
                    await job_round(args.concurrency)
            else:
                fn, body = handlers[method], bodies[method]

                async def one_round(fn=fn, body=body) -> None:
                    await asyncio.gather(*(fn(body, ctx) for _ in range(args.concurrency)))
            for _ in range(2):  # warm-up rounds
                await one_round()
            clock = _GcClock()
            gc.callbacks.append(clock)
            rounds = max(1, args.calls // args.concurrency)
            p0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
            for _ in range(rounds):
                await one_round()
            p1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
            gc.callbacks.remove(clock)
            n = rounds * args.concurrency
            out[method] = {
                "calls": n, "cpu_us_per_call": round((p1 - p0) / n * 1e6, 1),
                "main_thread_us_per_call": round((t1 - t0) / n * 1e6, 1),
                "wall_us_per_call": round((w1 - w0) / n * 1e6, 1),
                "gc_us_per_call": round(clock.seconds / n * 1e6, 1),
                "gc_collections_per_1000_calls": [round(c * 1000 / n, 2)
                                                  for c in clock.collections],
            }
    finally:
        await node.close()
        gc.unfreeze()  # as it was: the caller may be a test process
        gc.set_threshold(*threshold)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--method", default="Enqueue,GetJob",
                    help="comma list of Enqueue, GetJob, Job (a whole job: Enqueue, its share "
                         "of a LeaseTasks of 16, ReportOutcome; figures per job)")
    ap.add_argument("--forwarded", action="store_true",
                    help="serve each call as the owner serves a forwarded one (peer socket's "
                         "dispatch, no socket): the owner's side of a hop")
    ap.add_argument("--store", choices=("file", "memory"), default="file")
    args = ap.parse_args(argv)
    try:
        import uvloop
        rep = uvloop.run(run(args))
    except ImportError:
        rep = asyncio.run(run(args))
    for method, r in rep.items():
        print(f"{method:8s} {r['calls']:6d} calls  cpu {r['cpu_us_per_call']:7.1f} µs/call  "
              f"main thread {r['main_thread_us_per_call']:7.1f}  wall {r['wall_us_per_call']:7.1f}"
              f"  gc {r['gc_us_per_call']:6.1f} µs/call  collections/1000 calls "
              f"{r['gc_collections_per_1000_calls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
