"""A worker stream's free slots: slots a source reserved and did not use wake the
other sources (silo.rpc.work_session)."""

from __future__ import annotations

import asyncio

from silo.rpc import work_session
from silo.rpc.work_session import WorkSession


class _Svc:
    def __init__(self) -> None:
        self.node = object()


class _Shard:
    id = "s1"


class _Lease:
    """Stands for silo.shard.lease: the lease call waits for `gate`, then finds nothing."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.leases = 0

    async def lease_tasks(self, shard, worker_id, max_tasks, task_group) -> list:
        self.leases += 1
        await self.gate.wait()
        return []  # the task was gone by the time it was leased


def test_slots_back_from_an_empty_lease_wake_a_waiting_source(monkeypatch) -> None:
    asyncio.run(_test_slots_back_from_an_empty_lease_wake_a_waiting_source(monkeypatch))


async def _test_slots_back_from_an_empty_lease_wake_a_waiting_source(monkeypatch) -> None:
    calls = {"n": 0}

    def due_once(shard, group) -> bool:
        calls["n"] += 1
        return calls["n"] == 1

    async def never_due(shards, group, timeout_s, interrupt=None) -> bool:
        await asyncio.Event().wait()
        return False

    monkeypatch.setattr(work_session, "due_now", due_once)
    monkeypatch.setattr(work_session, "wait_due", never_due)
    gate = asyncio.Event()
    leasing = _Lease(gate)
    monkeypatch.setattr(work_session, "lease", leasing)
    session = WorkSession(_Svc(), None)  # type: ignore[arg-type]
    session.task_group, session.free = "g", 1
    local = asyncio.ensure_future(session._local_source([_Shard()]))
    async with asyncio.timeout(5):
        while leasing.leases == 0:  # the local source reserved the only slot
            await asyncio.sleep(0.001)
    assert session.free == 0
    other = asyncio.ensure_future(session._until_slot())  # e.g. the remote source
    await asyncio.sleep(0.01)
    assert not other.done()
    gate.set()  # the lease comes back empty: its slot is free again
    assert await asyncio.wait_for(other, 2.0) is True
    assert session.free == 1
    session._halt()
    local.cancel()
