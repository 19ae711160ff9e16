"""A statement's share of the shard's event loop while it reads and converts rows.

Reading rows (SlateDB's binding lifts every row into Python objects on the calling
thread) and decoding them into Arrow take the GIL, so they cannot usefully move to a
thread: the loop would wait for the GIL instead. They run on the loop in small slices
instead, and the statement paces itself: after about BUDGET_S of the loop thread's CPU
time it steps aside for as long again (LOOP_SHARE = 0.5), a real sleep rather than `sleep(0)`. A yield
of `sleep(0)` lets one turn of other work run before the statement takes the loop
back, but an Enqueue needs several turns (its handler, the group committer, SlateDB's
completion callbacks), each of which would wait for another slice; during a sleep they
all run. The hot path then waits at most about one slice per request, and a full scan
takes about 1/LOOP_SHARE times its CPU time.

Resting only helps when the hot path wants the loop. A statement rests only within
BUSY_HOLD_S of a commit having started in this process (`GroupCommitter.started`:
Enqueue, LeaseTasks, ReportOutcome, Heartbeat all commit); otherwise it yields one turn
per slice and goes on, so a scan on a quiet server takes about its CPU time, not twice
it. The loop thread's own CPU in that turn cannot serve as the signal: the statement's
read-ahead completions run there too, so the loop always looked busy (tried). Reads
that commit nothing (GetJob) are not seen: each of their steps waits at most a slice.

DataFusion's execution runs in a thread and releases the GIL while it computes
(measured: a 1 ms sleep on the loop thread oversleeps by 0.08 ms at p50 while a
DataFusion GROUP BY runs in a thread, 7 ms while a pure-Python thread runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

from silo.storage.db import GroupCommitter

BUDGET_S = 0.002  # work between two steps aside
FREE_S = 0.005  # work a statement does before pacing starts: indexed lookups never rest
LOOP_SHARE = 0.5  # fraction of the loop's time a reading statement may take
_MAX_REST_S = 0.02
BUSY_HOLD_S = 0.25  # after a commit started, rest at every step for at least this long


class Pacer:
    """Work/rest bookkeeping of one statement's reads on one loop."""

    def __init__(self, budget_s: float = BUDGET_S, share: float = LOOP_SHARE,
                 free_s: float = FREE_S) -> None:
        self.budget_s = budget_s
        self.share = share
        self.since = time.thread_time() + free_s
        self.rested_s = 0.0
        self.commits_seen = GroupCommitter.started
        self.busy_until = 0.0  # monotonic time until which every step rests

    async def tick(self) -> None:
        # CPU time of the loop thread, not wall time: waiting for storage is no work,
        # and other tasks' work in between makes the statement rest more, as it should.
        worked = time.thread_time() - self.since
        if worked < self.budget_s:
            return
        started = GroupCommitter.started
        if started != self.commits_seen:  # the hot path is at work: share the loop
            self.commits_seen = started
            self.busy_until = time.monotonic() + BUSY_HOLD_S
        elif time.monotonic() >= self.busy_until:  # nothing to make way for: one turn
            await asyncio.sleep(0)
            self.since = time.thread_time()
            return
        rest = min(_MAX_REST_S, worked * (1 / self.share - 1)) if self.share < 1 else 0.0
        t0 = time.perf_counter()
        await asyncio.sleep(rest)
        self.rested_s += time.perf_counter() - t0
        self.since = time.thread_time()


_pacer: ContextVar[Pacer | None] = ContextVar("silo_query_pacer", default=None)


@contextlib.contextmanager
def paced() -> Iterator[Pacer]:
    """Reads inside share one Pacer (set per statement and shard read)."""
    p = Pacer()
    token = _pacer.set(p)
    try:
        yield p
    finally:
        _pacer.reset(token)


async def tick() -> None:
    """Step aside if this statement has worked its budget (a plain yield otherwise)."""
    p = _pacer.get()
    if p is None:
        await asyncio.sleep(0)
    else:
        await p.tick()
