"""The shortcuts the stream protocol's per-job path takes must answer exactly what the
general code answers: the enc_str memo, the put_status key shortcut, ReadyBuffer.pop_one,
outcome.stage_final, limits.start_attempt without limits, stream.owner_elsewhere from
the node's dicts, and the (shard, tenant) checks done once per batch."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from silo._proto import silo_pb2 as pb
from silo.errors import SiloError
from silo.rpc import batch, stream
from silo.rpc.service import _FORWARDED
from silo.shard import lease, outcome
from silo.shard.buffer import ReadyBuffer
from silo.shard.state import scheduled_index_key, status_index_key
from silo.storage import keys
from silo.storage.records import SCHEDULED, SUCCEEDED, JobStatus, RunAttempt, task_decoder
from tests.unit.test_shard import T0, add, run


def _reference_enc(s: str) -> bytes:
    return s.encode().replace(b"\x00", b"\x00\xff") + b"\x00\x01"


@given(st.lists(st.text(), max_size=20))
def test_enc_str_memo_answers_the_encoding(strings):
    for s in strings + strings:  # the second time from the memo
        assert keys.enc_str(s) == _reference_enc(s)


def test_enc_str_memo_stays_bounded():
    for i in range(keys._ENCODED_MAX * 2 + 5):
        s = f"job-{i}\x00"
        assert keys.enc_str(s) == _reference_enc(s)
        assert len(keys._ENCODED) <= keys._ENCODED_MAX


def test_put_status_writes_the_general_keys():
    """Shard.put_status builds its status and index keys inline: the same bytes as
    keys.job_status and status_index_key, and the old index row goes."""
    async def body(s, clock):
        job_id = await add(s, tenant="t\x00x")
        status = JobStatus(SUCCEEDED, T0 + 5, last_attempt=1)
        old = JobStatus(SCHEDULED, T0, T0 + 7, 1)
        s.put_status("t\x00x", job_id, status, old=old)
        w = s.committer._staged.writes
        assert keys.job_status("t\x00x", job_id) in w
        assert w[status_index_key("t\x00x", job_id, status)] == b""
        assert w[status_index_key("t\x00x", job_id, old)] is None
        assert status_index_key("t\x00x", job_id, status) == keys.status_index(
            "t\x00x", "Succeeded", T0 + 5, job_id)
        for start in (0, -5, T0 + 9):
            assert scheduled_index_key("t\x00x", job_id, start) == keys.status_index(
                "t\x00x", "Scheduled", start, job_id)
    run(body)


def _key(start: int, job: str) -> bytes:
    return keys.task("g", start, 50, job, 1, "-")


def test_pop_one_is_pop_due_of_one():
    b = ReadyBuffer("g", 16)
    b.complete = True
    b.add(_key(5, "b"), RunAttempt("tb", "-", "b", 1, 1, "g"))
    b.add(_key(5, "a"), RunAttempt("ta", "-", "a", 1, 1, "g"))
    b.add(_key(3, "gone"), RunAttempt("tg", "-", "gone", 1, 1, "g"))
    b.add(_key(9, "later"), RunAttempt("tl", "-", "later", 1, 1, "g"))
    b.remove(_key(3, "gone"))  # a dead heap entry is skipped
    b.journal = {}  # a refill in flight records what leaves
    assert b.pop_one(4) is None
    key, task = b.pop_one(5)
    assert (key, task.job_id) == (_key(5, "a"), "a")
    assert b.journal == {_key(5, "a"): None}
    assert b.pop_one(5)[1].job_id == "b"
    assert b.pop_one(8) is None  # the next one is not due
    assert b.pop_one(9)[1].job_id == "later"
    assert b.pop_one(100) is None and len(b) == 0


def test_stage_final_is_synchronous_and_ends_the_job():
    async def body(s, clock):
        job_id = await add(s)
        (t,) = await lease.lease_tasks(s, "w", 1, "g")
        task_id = t.lease.task.task_id
        got = outcome.stage_final(s, task_id, outcome.Success(b"\xc0"))
        assert not asyncio.iscoroutine(got) and got.task.task_id == task_id
        await s.committer.commit()
        assert task_id not in s.leases and ("-", job_id) not in s.active
        with pytest.raises(SiloError) as e:
            outcome.stage_final(s, task_id, outcome.Success(b""))
        assert e.value.code.name == "NOT_FOUND"
        assert s.tenant_status.get(("-", "Succeeded")) == 1
    run(body)


def test_start_attempt_without_limits_queues_the_usual_task():
    async def body(s, clock):
        job_id = await add(s, priority=7, start_at_ms=T0 + 50)
        rows = await s.committer.scan_prefix(keys.kind_prefix(keys.TASK))
        (key, value), = rows
        assert key == keys.task("g", T0 + 50, 7, job_id, 1, "-")
        task = task_decoder.decode(value)
        assert isinstance(task, RunAttempt) and task.held_queues == []
        assert (task.attempt, task.relative_attempt, task.job_id) == (1, 1, job_id)
    run(body)


# ---- the RPC layer's shortcuts ---------------------------------------------------------


class _Node:
    def __init__(self, here: dict, owner_of: dict, index: int = 0,
                 tenancy: bool = True) -> None:
        self.shards = here
        self.owner_of = owner_of
        self.index = index
        self.tenancy = tenancy

    def publish(self, shard) -> None:
        pass


def test_owner_elsewhere_matches_svc_shard():
    from silo.rpc.service import SiloService

    here, there, opening = (str(uuid.uuid4()) for _ in range(3))
    svc = SiloService.__new__(SiloService)
    svc.node = _Node({here: object()}, {here: 0, there: 1, opening: 0})
    assert stream.owner_elsewhere(svc, here) is None
    assert stream.owner_elsewhere(svc, there) == 1
    assert stream.owner_elsewhere(svc, opening) is None  # here, not open yet
    assert stream.owner_elsewhere(svc, str(uuid.uuid4())) is None  # unknown
    assert stream.owner_elsewhere(svc, "not-a-uuid") is None
    assert stream.owner_elsewhere(svc, there.upper()) is None  # not the map's spelling
    tok = _FORWARDED.set(True)  # a forwarded call is never forwarded again
    try:
        assert stream.owner_elsewhere(svc, there) is None
    finally:
        _FORWARDED.reset(tok)


def test_batch_checks_each_shard_and_tenant_pair_once_with_the_same_answers():
    """enqueue_jobs and report_outcomes remember a (shard, tenant) pair's check within a
    pass: every job still gets its own answer, the same as one by one."""
    from silo.rpc.service import SiloService

    class Svc(SiloService):
        def __init__(self, s) -> None:
            self.node = _Node({s.id: s}, {s.id: 0})
            self.calls = 0

        def shard(self, shard_id):
            self.calls += 1
            return super().shard(shard_id)

    async def body(s, clock):
        svc = Svc(s)
        bad = str(uuid.uuid4())
        jobs = [pb.EnqueueRequest(shard=s.id, task_group="g", tenant="a"),
                pb.EnqueueRequest(shard=s.id, task_group="g", tenant="a"),
                pb.EnqueueRequest(shard=s.id, task_group="g"),  # no tenant: invalid
                pb.EnqueueRequest(shard=s.id, task_group="g"),
                pb.EnqueueRequest(shard=bad, task_group="g", tenant="a"),
                pb.EnqueueRequest(shard=s.id, task_group="", tenant="a")]

        async def slow(job):
            raise AssertionError("no job names its id")

        got = await batch.enqueue_jobs(svc, jobs, slow)
        assert all(isinstance(g, str) and g for g in got[:2]) and got[0] != got[1]
        for g in got[2:4]:
            assert isinstance(g, SiloError) and g.message == "tenant id required"
        assert isinstance(got[4], SiloError) and got[4].code.name == "NOT_FOUND"
        assert isinstance(got[5], SiloError) and got[5].code.name == "INVALID_ARGUMENT"
        assert svc.calls == 4  # (s, a), (s, ""), (bad, a) x1 failing, ... not 6
        leased = await lease.lease_tasks(s, "w", 8, "g")
        reqs = []
        for t in leased:
            r = pb.ReportOutcomeRequest(shard=s.id, task_id=t.lease.task.task_id,
                                        tenant_id="a")
            r.success.msgpack = b"\xc0"
            reqs.append(r)
        reqs.append(pb.ReportOutcomeRequest(shard=s.id, task_id=reqs[0].task_id))
        reqs[-1].success.msgpack = b"\xc0"
        svc.calls = 0
        out = await batch.report_outcomes(svc, reqs, slow)
        assert out[:2] == [None, None]
        assert isinstance(out[2], SiloError) and "tenant_id is required" in out[2].message
        assert svc.calls == 2
    run(body)


def test_lease_expiry_heap_drops_ended_leases_and_still_reaps(monkeypatch):
    """Ended leases leave stale expiry entries; put_lease rebuilds the heap from the
    live leases past a bound, so it stays small and a live lease still expires."""
    from silo.shard import state
    from silo.shard.reaper import reap_expired_leases

    monkeypatch.setattr(state, "_STALE_EXPIRY_SLACK", 4)

    async def body(s, clock):
        keep = await add(s)
        (kept,) = await lease.lease_tasks(s, "w", 1, "g")
        for _ in range(30):
            await add(s)
            (t,) = await lease.lease_tasks(s, "w", 1, "g")
            outcome.stage_final(s, t.lease.task.task_id, outcome.Success(b"\xc0"))
            await s.committer.commit()
            assert len(s.lease_expiry) <= 2 * 2 + 4 + 1  # at most 2 live at a put
        assert len(s.leases) == 1
        clock.t += s.config.lease_ms + 1
        assert await reap_expired_leases(s) == 1
        assert kept.lease.task.task_id not in s.leases
        assert ("-", keep) not in s.active or s.active[("-", keep)].kind == SCHEDULED
    run(body)
