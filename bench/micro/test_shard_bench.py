"""Micro-benchmarks of one shard's job operations without gRPC: enqueue, lease, complete.

Run them all with ``bench/micro.sh``; they are excluded from the default test run.

Each test opens a fresh ``Shard`` on SlateDB's in-memory object store (``memory:///``,
flush interval 1 ms, ``commit_interval_ms=0``: one group commit per event-loop pass)
inside a uvloop event loop, with the server's GC tuning
(``silo.runtime.server.tune_gc``), like the server. Every timed round runs ``OPS`` (200)
operations concurrently with ``asyncio.gather``, as concurrent RPCs would arrive, so
they share group commits. Whatever a round needs beforehand (jobs to lease, leases to
complete) is prepared by pytest-benchmark's untimed ``setup``.

pytest-benchmark's times are per round of 200. Per operation, in ``extra_info``:

* ``us_per_op``: mean wall time of a round ÷ 200 (includes the amortised wait for
  the WAL flush to the memory store); ``us_per_op_median``: the same from the median
  round, less sensitive to the odd slow round (memtable flush, GC);
* ``cpu_us_per_op``: CPU time of the whole process (``time.process_time``: the event
  loop plus SlateDB's native threads) over the timed rounds ÷ their operations. This is
  the figure to compare with the server's CPU per operation under gRPC load.

Tests: ``enqueue`` (one job, 100 B payload); ``lease[x1]`` (200 LeaseTasks of one task
each); ``lease[x16]`` (13 LeaseTasks of up to 16 tasks, as bench/load.py's workers poll;
per leased task); ``complete`` (ReportOutcome success of a leased task); ``lifecycle``
(enqueue, lease by 16, complete, per job).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

try:
    import silo  # noqa: F401
except ImportError:  # plain `pytest` from elsewhere: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import uvloop  # noqa: E402

from silo.shard import enqueue, lease, outcome  # noqa: E402
from silo.shard.state import Shard, ShardConfig  # noqa: E402

pytestmark = pytest.mark.microbench

OPS = 200  # operations per timed round
ROUNDS = 40
WARMUP_ROUNDS = 3
GROUP = "bench"
PAYLOAD = os.urandom(100)
RESULT = b"\x81\xa2ok\xc3"


@pytest.fixture(scope="module")
def loop():
    """A uvloop event loop, with the server's garbage-collector tuning while it lives."""
    from silo.runtime.server import tune_gc

    threshold = gc.get_threshold()
    tune_gc()
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.fixture
def shard(loop):
    s = loop.run_until_complete(Shard.open(
        str(uuid.uuid4()), "", "", "memory:///",
        ShardConfig(commit_interval_ms=0, flush_interval_ms=1)))
    yield s
    loop.run_until_complete(s.close())


# ---- operations ---------------------------------------------------------------


def one_enqueue(s: Shard):
    return enqueue.enqueue(s, tenant="-", job_id="", priority=50, start_at_ms=0,
                           retry_policy=None, payload=PAYLOAD, limits=[], metadata={},
                           task_group=GROUP)


async def enqueue_n(s: Shard, n: int) -> list[str]:
    return await asyncio.gather(*(one_enqueue(s) for _ in range(n)))


async def lease_n(s: Shard, n: int, per_call: int) -> list[str]:
    """Lease n tasks with concurrent LeaseTasks calls of up to per_call; their task ids."""
    calls = [min(per_call, n - i) for i in range(0, n, per_call)]
    got = await asyncio.gather(*(lease.lease_tasks(s, "bench-worker", k, GROUP) for k in calls))
    ids = [lt.lease.task.task_id for batch in got for lt in batch]
    assert len(ids) == n, f"leased {len(ids)} of {n}"
    return ids


async def complete_all(s: Shard, task_ids: list[str]) -> None:
    await asyncio.gather(*(outcome.report_outcome(s, t, outcome.Success(RESULT))
                           for t in task_ids))


# ---- harness ------------------------------------------------------------------


def bench_rounds(benchmark, loop, round_fn, setup_fn=None) -> None:
    """Time round_fn(prepared) over ROUNDS rounds; per-op wall and CPU to extra_info."""
    cpu: list[float] = []
    prepared: list = [None]

    def setup():
        prepared[0] = loop.run_until_complete(setup_fn()) if setup_fn else None

    def run():
        c0 = time.process_time()
        loop.run_until_complete(round_fn(prepared[0]))
        cpu.append(time.process_time() - c0)

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                       iterations=1)
    timed = cpu[-ROUNDS:]
    benchmark.extra_info["ops_per_round"] = OPS
    benchmark.extra_info["us_per_op"] = round(benchmark.stats.stats.mean / OPS * 1e6, 2)
    benchmark.extra_info["us_per_op_median"] = round(benchmark.stats.stats.median / OPS * 1e6, 2)
    benchmark.extra_info["cpu_us_per_op"] = round(sum(timed) / (len(timed) * OPS) * 1e6, 2)


# ---- benchmarks ---------------------------------------------------------------


def test_shard_enqueue(benchmark, loop, shard):
    async def rnd(_):
        await enqueue_n(shard, OPS)

    bench_rounds(benchmark, loop, rnd)
    assert shard.total_jobs == OPS * (ROUNDS + WARMUP_ROUNDS)


@pytest.mark.parametrize("per_call", [1, 16], ids=["x1", "x16"])
def test_shard_lease(benchmark, loop, shard, per_call):
    async def setup():
        await enqueue_n(shard, OPS)

    async def rnd(_):
        await lease_n(shard, OPS, per_call)

    bench_rounds(benchmark, loop, rnd, setup)
    assert len(shard.leases) == OPS * (ROUNDS + WARMUP_ROUNDS)
    benchmark.extra_info["tasks_per_call"] = per_call


def test_shard_complete(benchmark, loop, shard):
    async def setup():
        await enqueue_n(shard, OPS)
        return await lease_n(shard, OPS, OPS)

    async def rnd(task_ids):
        await complete_all(shard, task_ids)

    bench_rounds(benchmark, loop, rnd, setup)
    assert shard.completed_jobs == OPS * (ROUNDS + WARMUP_ROUNDS)
    assert not shard.leases


def test_shard_lifecycle(benchmark, loop, shard):
    async def rnd(_):
        await enqueue_n(shard, OPS)
        await complete_all(shard, await lease_n(shard, OPS, 16))

    bench_rounds(benchmark, loop, rnd)
    assert shard.completed_jobs == OPS * (ROUNDS + WARMUP_ROUNDS)
