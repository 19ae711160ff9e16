"""Wake-ups for push subscribers: "a task was added to task group G's ready queue".

The shard calls `notify` whenever it adds a pending task (enqueue, a concurrency
grant, a retry, an expired lease's retry, a refresh task) and when a ready buffer's
refill brings tasks in from storage, so a worker stream waiting
for work wakes at once instead of polling. A waiter is one future shared by all the
shards it watches; it is dropped from every shard when it wakes. With no waiter,
`notify` costs one dict lookup.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from silo.shard.state import Shard


RELAYED_SECOND_CHANCE_S = 0.02


class ReadySignal:
    """Waiters of each task group. `first` ones (a worker stream of this process) are
    all woken at once. `later` ones (a stream of another process, waiting through a
    StreamWait relay) are woken one per notify, the longest-waiting first, and one
    loop pass after the first ones when there were any: a first waiter leases in the
    pass it wakes in, so the later one re-checks after it and sleeps on if nothing is
    left. A woken relayed waiter costs its stream two relays (the wait's answer, then
    LeaseTasks@local), so waking every one for every task made each remote stream
    spend them, all but one on an empty lease: measured at 20 jobs/s, 2.65 relays per
    job with a stream on each process, 2.1 at 300 jobs/s with both on one process.
    Should the woken one not lease (its stream had no free slot by then), the next
    relayed waiter is woken RELAYED_SECOND_CHANCE_S later; it re-checks locally."""

    __slots__ = ("_waiters", "_later", "_second")

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[Any]]] = {}
        self._later: dict[str, dict[asyncio.Future[Any], None]] = {}  # in arrival order
        self._second: dict[str, asyncio.TimerHandle] = {}

    def notify(self, task_group: str) -> None:
        first = self._waiters.pop(task_group, None)
        woke = False
        if first:
            for f in first:
                if not f.done():
                    f.set_result(None)
                    woke = True
        if task_group in self._later:
            self._wake_later(task_group, woke)

    def _wake_later(self, task_group: str, defer: bool, again: bool = True) -> None:
        later = self._later.get(task_group)
        while later:
            f = next(iter(later))
            del later[f]
            if f.done():
                continue
            loop = asyncio.get_running_loop()
            if defer:
                loop.call_soon(_resolve, f, None)
            else:
                f.set_result(None)
            if again and later and task_group not in self._second:
                self._second[task_group] = loop.call_later(
                    RELAYED_SECOND_CHANCE_S, self._second_chance, task_group)
            break
        if not later:
            self._later.pop(task_group, None)

    def _second_chance(self, task_group: str) -> None:
        del self._second[task_group]
        self._wake_later(task_group, False, again=False)  # once per notify: no polling

    def add(self, task_group: str, fut: asyncio.Future[Any], later: bool = False) -> None:
        if later:
            self._later.setdefault(task_group, {})[fut] = None
        else:
            self._waiters.setdefault(task_group, set()).add(fut)

    def discard(self, task_group: str, fut: asyncio.Future[Any]) -> None:
        waiters = self._waiters.get(task_group)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[task_group]
        later = self._later.get(task_group)
        if later is not None:
            later.pop(fut, None)
            if not later:
                del self._later[task_group]


def next_due_ms(shard: Shard, task_group: str) -> int | None:
    """Start time of the earliest pending task of the group (None: nothing pending).

    The group's ready buffer answers (silo.shard.buffer): its head is the earliest
    task. An empty buffer that has not seen the end of the group's task rows starts a
    refill in the background and answers None for now: the refill notifies the group's
    waiters when it brings tasks in, so nobody is woken for work that may not exist
    (a stream would otherwise take a slot to lease from every shard it has not read)."""
    buf = shard.buffer(task_group)
    t = buf.head_ms()
    if t is None and not buf.complete:
        buf.refill_soon(shard)
    return t


def due_now(shard: Shard, task_group: str) -> bool:
    t = next_due_ms(shard, task_group)
    return t is not None and t <= shard.now()


STOP = object()  # what `interrupt`'s futures are resolved with to end a wait


async def wait_due(shards: list[Shard], task_group: str, timeout_s: float,
                   interrupt: set[asyncio.Future[object]] | None = None, *,
                   relayed: bool = False) -> bool:
    """Return True as soon as one of `shards` has a due task of the group, False after
    timeout_s without one. Sleeps on the shards' ready signals and on the earliest
    future start time: no polling.

    The sleep is one plain future that `notify` resolves, with a timer for the deadline:
    the waiter resumes in the very next loop pass (asyncio.wait_for, or a task per wait,
    took two to four passes and as many allocations), which is what lets the lease it
    makes join the group commit of the write that woke it (silo.storage.db). The
    caller may end the wait early: while waiting, the future is in `interrupt`;
    resolving it with STOP returns False. `relayed`: the waiter is a stream of another
    process, woken after this process's own (ReadySignal)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        earliest = None
        for s in shards:
            t = next_due_ms(s, task_group)
            if t is not None:
                if t <= s.now():
                    return True
                wait = (t - s.now()) / 1000
                earliest = wait if earliest is None else min(earliest, wait)
        left = deadline - loop.time()
        if left <= 0:
            return False
        wait = left if earliest is None else min(left, earliest + 0.001)
        fut: asyncio.Future[object] = loop.create_future()
        timer = loop.call_later(wait, _resolve, fut, None)
        for s in shards:
            s.ready.add(task_group, fut, relayed)
        if interrupt is not None:
            interrupt.add(fut)
        try:
            got = await fut
        finally:
            timer.cancel()
            if interrupt is not None:
                interrupt.discard(fut)
            for s in shards:
                s.ready.discard(task_group, fut)
        if got is STOP:
            return False


def _resolve(fut: asyncio.Future[object], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def interrupt_all(waits: set[asyncio.Future[object]]) -> None:
    """End every wait_due sleeping on one of `waits` (it returns False)."""
    for f in list(waits):
        _resolve(f, STOP)
