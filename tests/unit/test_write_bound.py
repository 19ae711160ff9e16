"""The group committer's write bound: a write not durable in time fails its waiters
(StorageError → UNAVAILABLE) instead of hanging them, and recovery is automatic."""

from __future__ import annotations

import asyncio
import time

import pytest

from silo.storage.db import GroupCommitter, StorageError


class _Handle:
    def __init__(self, gate: asyncio.Event) -> None:
        self._gate = gate

    async def await_durable(self) -> None:
        await self._gate.wait()


class StuckDb:
    """A database whose writes are accepted but become durable only once `gate` is set,
    like SlateDB's WAL on a full disk."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.writes = 0

    async def write(self, _batch) -> _Handle:
        self.writes += 1
        return _Handle(self.gate)


async def _commit(c: GroupCommitter, key: bytes) -> None:
    c.put(key, b"v")
    await c.commit()


def test_stuck_write_fails_within_bound_then_recovers():
    async def main() -> None:
        db = StuckDb()
        c = GroupCommitter(db, commit_interval_s=0)
        c.write_timeout_s = 0.3
        events: list[bool] = []
        c.on_stall = events.append

        t0 = time.monotonic()
        with pytest.raises(StorageError, match="not durable within 0.3 s"):
            await asyncio.wait_for(_commit(c, b"a"), 10)
        assert 0.25 <= time.monotonic() - t0 < 5
        assert events == [True] and c.stalled_since is not None

        # While stalled, later writes fail at once instead of queueing behind it.
        t0 = time.monotonic()
        with pytest.raises(StorageError):
            await asyncio.wait_for(_commit(c, b"b"), 10)
        assert time.monotonic() - t0 < 0.25
        assert events == [True]  # one stall, one notification (one log line)

        db.gate.set()  # space is back: the pending writes become durable
        for _ in range(200):
            if c.stalled_since is None:
                break
            await asyncio.sleep(0.01)
        assert events == [True, False]
        await asyncio.wait_for(_commit(c, b"c"), 5)
        await c.close()

    asyncio.run(main())


def test_durable_write_is_acknowledged_normally():
    async def main() -> None:
        db = StuckDb()
        db.gate.set()
        c = GroupCommitter(db, commit_interval_s=0.001)
        c.write_timeout_s = 0.05
        await asyncio.wait_for(asyncio.gather(*(_commit(c, b"k%d" % i) for i in range(50))), 5)
        await asyncio.sleep(0.1)  # past the bound: the settled batches' timers are cancelled
        assert c.stalled_since is None
        await c.close()

    asyncio.run(main())
