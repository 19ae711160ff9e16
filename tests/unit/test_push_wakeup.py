"""How a worker stream is woken for a new task, and what the wake-up costs in commits.

* wait_due sleeps on one plain future: the waiter resumes in the loop pass right after
  `notify`, with no polling, and `interrupt_all` ends the sleep at once;
* the waiters of this process's streams are woken before those that wait through a
  relay for a stream of another process, which re-check one pass later; and of those,
  one per notify (the next one a little later, should the first not lease);
* an idle committer hands its batch to the writer one pass after the pass that opened
  it, so the lease a woken stream makes joins the enqueue's batch: one write and one
  WAL flush for both, not two in a row.

Nothing here depends on timing: each step is counted in loop passes (`asyncio.sleep(0)`)
or in batches written.
"""

from __future__ import annotations

import asyncio
import uuid

from silo.shard import enqueue, lease
from silo.shard.ready import ReadySignal, interrupt_all, wait_due
from silo.shard.state import Shard, ShardConfig
from silo.storage.db import GroupCommitter
from tests.unit.test_shard import Clock


class _Buffer:
    complete = True

    def __init__(self) -> None:
        self.head: int | None = None

    def head_ms(self) -> int | None:
        return self.head


class _Shard:
    """What wait_due reads of a shard: its ready signal, one buffer, a clock."""

    def __init__(self) -> None:
        self.ready = ReadySignal()
        self.buf = _Buffer()

    def buffer(self, task_group: str) -> _Buffer:
        return self.buf

    def now(self) -> int:
        return 1_000


async def _passes(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_waiter_resumes_in_the_pass_after_notify() -> None:
    async def main() -> None:
        s = _Shard()
        waiter = asyncio.ensure_future(wait_due([s], "g", 60.0))
        await _passes(3)
        assert not waiter.done()
        s.buf.head = 900  # a due task came in
        s.ready.notify("g")
        await _passes(1)
        assert waiter.done() and waiter.result() is True

    asyncio.run(main())


def test_interrupt_ends_a_wait_at_once() -> None:
    async def main() -> None:
        s = _Shard()
        sleeping: set[asyncio.Future[object]] = set()
        waiter = asyncio.ensure_future(wait_due([s], "g", 60.0, sleeping))
        await _passes(2)
        assert len(sleeping) == 1
        interrupt_all(sleeping)
        await _passes(1)
        assert waiter.done() and waiter.result() is False
        assert not sleeping and not s.ready._waiters

    asyncio.run(main())


def test_relayed_waiters_are_woken_one_pass_after_local_ones() -> None:
    async def main() -> None:
        sig = ReadySignal()
        loop = asyncio.get_running_loop()
        local, relayed = loop.create_future(), loop.create_future()
        sig.add("g", local)
        sig.add("g", relayed, later=True)
        sig.notify("g")
        assert local.done() and not relayed.done()
        await _passes(1)
        assert relayed.done()
        alone = loop.create_future()  # no local waiter: a relayed one is woken at once
        sig.add("g", alone, later=True)
        sig.notify("g")
        assert alone.done()

    asyncio.run(main())


def test_one_relayed_waiter_is_woken_per_notify_the_next_one_later() -> None:
    async def main() -> None:
        sig = ReadySignal()
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        sig.add("g", a, later=True)
        sig.add("g", b, later=True)
        sig.notify("g")
        assert a.done() and not b.done()  # the longest-waiting one
        await _passes(3)
        assert not b.done()
        await asyncio.wait_for(b, 5)  # its second chance (RELAYED_SECOND_CHANCE_S)
        assert not sig._later and not sig._second

    asyncio.run(main())


def test_a_relayed_waiter_sleeps_on_when_the_local_one_took_the_task() -> None:
    async def main() -> None:
        s = _Shard()

        async def local_stream() -> None:
            assert await wait_due([s], "g", 60.0)
            s.buf.head = None  # leased in the pass it woke in

        local = asyncio.ensure_future(local_stream())
        relayed = asyncio.ensure_future(wait_due([s], "g", 60.0, relayed=True))
        await _passes(2)
        s.buf.head = 900
        s.ready.notify("g")
        await _passes(4)
        assert local.done() and not relayed.done()  # back asleep: no empty lease relay
        s.buf.head = 950
        s.ready.notify("g")  # no local waiter left: the relayed one wakes
        await _passes(2)
        assert relayed.done() and relayed.result() is True

    asyncio.run(main())


class _CountingDb:
    def __init__(self) -> None:
        self.writes = 0

    async def write(self, _batch):
        self.writes += 1
        return _Durable()


class _Durable:
    async def await_durable(self) -> None:
        return None


def test_an_idle_committer_takes_in_what_the_staging_pass_woke() -> None:
    async def main() -> None:
        db = _CountingDb()
        c = GroupCommitter(db, commit_interval_s=0)
        woken = asyncio.get_running_loop().create_future()

        async def stream() -> None:
            await woken  # resumes in the pass after the one that resolved it
            c.put(b"lease", b"1")
            await c.commit()

        other = asyncio.ensure_future(stream())
        await _passes(1)
        c.put(b"job", b"1")
        done = c.commit()
        woken.set_result(None)  # "notify", from the staging operation
        await asyncio.wait_for(asyncio.gather(done, other), 5)
        assert db.writes == 1 and c.ops_written == 2
        c.put(b"alone", b"1")  # and a lone write still goes at once
        await asyncio.wait_for(c.commit(), 5)
        assert db.writes == 2
        await c.close()

    asyncio.run(main())


def test_enqueue_and_the_lease_of_a_waiting_stream_share_one_commit() -> None:
    """On a real shard: a stream sleeping in wait_due wakes on the enqueue and leases the
    task; the job's rows and its lease go to storage in one batch."""

    async def main() -> None:
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                             ShardConfig(commit_interval_ms=0, flush_interval_ms=1), Clock())
        try:
            async def stream() -> list:
                while not await wait_due([s], "g", 60.0):
                    pass
                return await lease.lease_tasks(s, "w1", 8, "g")

            leasing = asyncio.ensure_future(stream())
            for _ in range(50):  # opened: the first refill found the group empty
                await _passes(1)
                if s.buffer("g").complete and s.ready._waiters:
                    break
            assert s.ready._waiters
            before = s.committer.batches_written
            await enqueue.enqueue(s, tenant="-", job_id="j1", priority=50, start_at_ms=0,
                                  retry_policy=None, payload=b"x", limits=[], metadata={},
                                  task_group="g")
            got = await asyncio.wait_for(leasing, 10)
            assert [t.lease.task.job_id for t in got] == ["j1"]
            assert s.committer.batches_written - before == 1
        finally:
            await s.close()

    asyncio.run(main())
