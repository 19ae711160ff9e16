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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from silo.shard.state import Shard


class ReadySignal:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def notify(self, task_group: str) -> None:
        waiters = self._waiters.pop(task_group, None)
        if waiters:
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def add(self, task_group: str, fut: asyncio.Future[None]) -> None:
        self._waiters.setdefault(task_group, set()).add(fut)

    def discard(self, task_group: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(task_group)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[task_group]


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


async def wait_due(shards: list[Shard], task_group: str, timeout_s: float) -> bool:
    """Return True as soon as one of `shards` has a due task of the group, False after
    timeout_s without one. Sleeps on the shards' ready signals and on the earliest
    future start time: no polling."""
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
        fut: asyncio.Future[None] = loop.create_future()
        for s in shards:
            s.ready.add(task_group, fut)
        try:
            await asyncio.wait_for(fut, wait)
        except TimeoutError:
            pass
        finally:
            for s in shards:
                s.ready.discard(task_group, fut)
