"""The job list's pages read about a page of keys (the enqueue-time indexes, silo.query.
timeorder_read) and return exactly what an unindexed read of every job returns."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silo.query import ranges, timeorder
from silo.query.engine import query_shard
from silo.shard import enqueue as enq
from silo.shard import lease, outcome
from silo.shard.state import Shard, ShardConfig
from silo.storage.records import JobInfo
from silo.web import joblist
from tests.unit.test_shard import T0, Clock, run_populated

N = 1500
PER_PAGE = 20


async def _populate(s: Shard, clock: Clock) -> None:
    for i in range(N):
        tenant = "a" if i % 5 else "b"
        group = ("rare" if i % 50 == 0 else "g") if i % 3 else "h"
        meta = {"user": f"u{i % 10}"}
        if i % 100 == 7:
            meta["batch"] = "few"
        # Many jobs share an enqueue time (ties on the order column).
        enq._stage(s, JobInfo(f"j{i:05d}", tenant, i % 10, T0 - 10_000 + i // 7, b"\x80",
                              None, meta, [], group))
    await s.committer.commit()
    clock.t = T0 + 1
    for _ in range(4):
        for lt in await lease.lease_tasks(s, "w", 100, "h"):
            ok = int(lt.lease.task.job_id[1:]) % 2
            await outcome.report_outcome(s, lt.lease.task.task_id,
                                         outcome.Success(b"") if ok else
                                         outcome.Failure("E", b""))
    await lease.lease_tasks(s, "w", 5, "rare")  # a few Running


def _run(body):
    return run_populated(_populate, body)


async def _page(s: Shard, f: joblist.Filters, cursor, per_page=PER_PAGE):
    sql, params = joblist.build(f, cursor, per_page + 1)
    with ranges.count_reads() as n:
        rows = (await query_shard(s, sql, params)).to_pylist()
    return n[0], joblist.page_of(rows, cursor, per_page, joblist.order_column(f))


FILTERS = [
    joblist.Filters(),
    joblist.Filters(tenant="a"),
    joblist.Filters(status="Succeeded"),
    joblist.Filters(status="Waiting"),
    joblist.Filters(status="Failed", tenant="a"),
    joblist.Filters(task_group="g"),
    joblist.Filters(task_group="rare", tenant="b"),
    joblist.Filters(meta_key="user", meta_value="u3"),
    joblist.Filters(meta_key="user", meta_value="u4", status="Waiting", task_group="g"),
    joblist.Filters(meta_key="batch", meta_value="few"),
    joblist.Filters(status="Running"),
]


def _key(r: dict, f: joblist.Filters) -> tuple:
    return (r[joblist.order_column(f)], r["id"], r["shard_id"])


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: repr(f)[8:60])
def test_every_page_equals_the_unindexed_list(f, monkeypatch):
    async def body(s, clock):
        pages, reads = [], []
        cursor = None
        while True:
            n, (rows, older, _newer) = await _page(s, f, cursor)
            pages.append(rows)
            reads.append(n)
            if older is None:
                break
            cursor = older
        # Back one page from the last: the "newer" link gives the page before it.
        if len(pages) > 1:
            first_of_last = pages[-1][0]
            back = joblist.Cursor(int(first_of_last[joblist.order_column(f)]),
                                  first_of_last["id"], first_of_last["shard_id"], older=False)
            _, (rows, _, _) = await _page(s, f, back)
            assert [_key(r, f) for r in rows] == [_key(r, f) for r in pages[-2]]
        with monkeypatch.context() as m:  # the same statement without the pushdown
            m.setattr(timeorder, "served", lambda scan: None)
            sql, params = joblist.build(f, None, 10 * N)
            want = (await query_shard(s, sql, params)).to_pylist()
        got = [r for p in pages for r in p]
        assert [_key(r, f) for r in got] == [_key(r, f) for r in want]
        assert got == want
        return reads
    reads = _run(body)
    assert reads


@pytest.mark.parametrize("f", [
    joblist.Filters(), joblist.Filters(tenant="a"), joblist.Filters(status="Succeeded"),
    joblist.Filters(task_group="g"), joblist.Filters(meta_key="user", meta_value="u3"),
    joblist.Filters(status="Running"),
], ids=lambda f: repr(f)[8:60])
def test_a_page_reads_about_a_page_of_keys(f):
    """Page 1 and a deep page (keyset) each read a few keys per row shown: the index
    rows, one status and one info row per candidate, plus the rows tied at the end."""
    async def body(s, clock):
        n1, (rows, older, _) = await _page(s, f, None)
        assert len(rows) == PER_PAGE or f.status == "Running"
        cursor = older
        for _ in range(5):
            if cursor is None:
                break
            _, (_, cursor2, _) = await _page(s, f, cursor)
            cursor = cursor2 or cursor
        deep = n1 if cursor is None else (await _page(s, f, cursor))[0]
        return n1, deep
    n1, deep = _run(body)
    # ~3 reads per candidate; Succeeded (≈1 job in 6) walks ~6 candidates per row.
    bound = 40 * (PER_PAGE + 1) if "Succeeded" in repr(f) else 6 * (PER_PAGE + 1) + 30
    assert n1 <= bound, n1
    assert deep <= bound, deep


def test_a_cursor_predicate_is_recognised_and_others_are_not():
    from silo.query import engine  # noqa: PLC0415

    sql, params = joblist.build(joblist.Filters(task_group="g"),
                                joblist.Cursor(5, "j1", "s", older=True), 11)
    [scan] = engine.plan(sql, params).scans
    assert scan.keyset == timeorder.Keyset("enqueue_time_ms", 5, "j1", "s", True)
    assert scan.job_groups == {"g"} and timeorder.served(scan) == "enqueue"
    sql, params = joblist.build(joblist.Filters(status="Failed"),
                                joblist.Cursor(5, "j1", "s", older=False), 11)
    [scan] = engine.plan(sql, params).scans
    assert scan.keyset == timeorder.Keyset("status_changed_at_ms", 5, "j1", "s", False)
    assert timeorder.served(scan) == "status"
    [scan] = engine.plan("SELECT id FROM jobs WHERE enqueue_time_ms < 5 OR id = 'x' "
                         "ORDER BY enqueue_time_ms DESC LIMIT 3", []).scans
    assert scan.keyset is None and scan.unrecognised and not timeorder.served(scan)
    [scan] = engine.plan("SELECT id FROM jobs ORDER BY enqueue_time_ms LIMIT 3", []).scans
    assert not timeorder.served(scan)  # oldest first: not the list's shape


_job = st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["g", "h", ""]),
                 st.integers(0, 3), st.sampled_from(["x", "y"]), st.booleans())
_filters = st.builds(
    joblist.Filters,
    status=st.sampled_from(["", "Waiting", "Running", "Scheduled"]),
    task_group=st.sampled_from([None, "g", ""]),
    tenant=st.sampled_from([None, "a", "c"]),
    meta_key=st.sampled_from(["", "m"]),
    meta_value=st.sampled_from(["x", "y"]))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_job, min_size=8, max_size=40), _filters, st.integers(1, 4))
def test_pages_equal_the_unindexed_answer_for_any_jobs(jobs, f, per_page):
    """Random jobs (tenants, groups, equal enqueue times, metadata, some leased, some
    not yet due) and filters: the pages, followed both ways, are the unindexed list."""
    if f.meta_key != "m":
        f = joblist.Filters(f.status, f.task_group, f.tenant)

    async def main():
        clock = Clock()
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                             ShardConfig(commit_interval_ms=0, flush_interval_ms=1), clock)
        try:
            for i, (tenant, group, ms, value, later) in enumerate(jobs):
                at = T0 + 1000 + ms if later else T0 - 100 + ms  # later: not due yet
                enq._stage(s, JobInfo(f"j{i:03d}", tenant, 5, at, b"\x80", None,
                                      {"m": value}, [], group))
            await s.committer.commit()
            await lease.lease_tasks(s, "w", 3, "g")
            pages, cursor = [], None
            while True:
                _, (rows, older, _) = await _page(s, f, cursor, per_page)
                pages.append(rows)
                if older is None:
                    break
                cursor = older
            got = [_key(r, f) for p in pages for r in p]
            with pytest.MonkeyPatch.context() as m:
                m.setattr(timeorder, "served", lambda scan: None)
                sql, params = joblist.build(f, None, 10_000)
                want = [_key(r, f) for r in (await query_shard(s, sql, params)).to_pylist()]
            assert got == want
            if len(pages) > 1:  # one page back from the last
                first = pages[-1][0]
                back = joblist.Cursor(int(first[joblist.order_column(f)] or 0), first["id"],
                                      first["shard_id"], older=False)
                _, (rows, _, _) = await _page(s, f, back, per_page)
                assert [_key(r, f) for r in rows] == [_key(r, f) for r in pages[-2]]
        finally:
            await s.close()
    asyncio.run(main())


@pytest.mark.parametrize("word", ["Waiting", "Succeeded", "Running"])
def test_a_status_in_enqueue_order_walks_or_falls_back_and_agrees(word, monkeypatch):
    """A status filter under ORDER BY enqueue_time_ms: a common status walks the
    enqueue-time index confirming statuses, a rare one reads the status index; both
    return what the unindexed read returns."""
    sql = ("SELECT id, enqueue_time_ms FROM jobs WHERE status_kind = $1 "
           "ORDER BY enqueue_time_ms DESC, id DESC, shard_id DESC LIMIT 7")

    async def body(s, clock):
        with ranges.count_reads() as n:
            got = (await query_shard(s, sql, [word])).to_pylist()
        with monkeypatch.context() as m:
            m.setattr(timeorder, "served", lambda scan: None)
            want = (await query_shard(s, sql, [word])).to_pylist()
        return got, want, n[0]
    got, want, reads = _run(body)
    assert got == want and len(got) == (5 if word == "Running" else 7)
    if word == "Waiting":  # most jobs are Waiting: a walk of a few pages' worth
        assert reads <= 200, reads
