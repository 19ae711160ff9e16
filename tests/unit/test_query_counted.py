"""Counting statements answered from the status counters (silo.query.counted): one row
per counter reaches DataFusion, the rewritten statement sums them, and every answer
equals the per-job evaluation, on one shard and across shards."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from silo.query import counted, engine, ranges, settings
from silo.query.engine import query_shard
from silo.shard import enqueue as enq
from silo.shard import import_
from silo.shard.state import Shard, ShardConfig
from silo.storage.records import ATTEMPT_FAILED, ATTEMPT_SUCCEEDED, JobInfo
from tests.unit.test_query import populate
from tests.unit.test_shard import T0, Clock

BIG = 700  # jobs in tenant "big"

STATEMENTS = [
    "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'acme' GROUP BY status_kind "
    "ORDER BY status_kind",
    "SELECT COUNT(*) FROM jobs WHERE tenant = 'acme'",
    "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'nobody'",
    "SELECT COUNT(*) AS n FROM jobs",
    "SELECT tenant, status_kind, count(*) AS c FROM jobs GROUP BY tenant, status_kind "
    "ORDER BY tenant, status_kind",
    "SELECT status_kind, count(1) FROM jobs GROUP BY status_kind HAVING count(*) > 1 "
    "ORDER BY count(*) DESC, status_kind LIMIT 3",
    "SELECT COUNT(*) * 2 + 1 AS x FROM jobs WHERE tenant = 'big' AND status_kind IN "
    "('Failed', 'waiting')",
    "SELECT tenant, COUNT(*) AS n FROM jobs WHERE status_kind <> 'Succeeded' GROUP BY tenant "
    "ORDER BY tenant",
    "SELECT s, n FROM (SELECT status_kind AS s, COUNT(*) AS n FROM jobs WHERE tenant = 'big' "
    "GROUP BY status_kind) ORDER BY n DESC, s",
    "SELECT DISTINCT status_kind FROM jobs WHERE tenant = 'acme' ORDER BY status_kind",
    "SELECT count(DISTINCT status_kind) AS k FROM jobs",
    "SELECT COUNT(*) AS \"count(*)\", 'count(*)' AS lit FROM jobs WHERE tenant = 'big'",
]


async def _fill_big(s: Shard, tenant: str = "big", n: int = BIG) -> None:
    """Jobs in every status the counters keep: Succeeded, Failed, Waiting, Scheduled."""
    jobs = []
    for i in range(n):
        attempts = ([import_.ImportedAttempt(ATTEMPT_FAILED, T0 - 20, T0 - 10)] if i % 7 == 0
                    else [import_.ImportedAttempt(ATTEMPT_SUCCEEDED, T0 - 20, T0 - 10)]
                    if i % 7 < 5 else [])
        start = T0 + 3_600_000 if i % 7 == 6 else 0
        jobs.append(import_.ImportJob(f"b{i:05d}", 5, 0, start, None, b"\x80", [], {}, "g",
                                      attempts))
    for r in await import_.import_jobs(s, tenant, jobs):
        assert r.success
    enq._stage(s, JobInfo("x-1", "tiny", 1, 0, b"\x80", None, {}, [], "g"))
    await s.committer.commit()


def _run(body, shards: int = 1):
    async def main():
        clock = Clock()
        opened = [await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                                   ShardConfig(commit_interval_ms=0, flush_interval_ms=1), clock)
                  for _ in range(shards)]
        try:
            await populate(opened[0], clock)
            for i, s in enumerate(opened):
                await _fill_big(s, n=BIG - 100 * i)
            return await body(opened, clock)
        finally:
            for s in opened:
                await s.close()
    return asyncio.run(main())


def _per_job(monkeypatch):
    monkeypatch.setattr(settings, "SETTINGS",
                        settings.QuerySettings(count_from_status_counters=False))


@pytest.mark.parametrize("sql", STATEMENTS)
def test_counter_answer_equals_the_per_job_answer(sql, monkeypatch):
    async def body(shards, clock):
        [s] = shards
        planned = engine.plan(sql, [])
        assert planned.weighted_sql is not None, sql
        with ranges.count_reads() as reads:
            fast = await query_shard(s, sql, [])
        _per_job(monkeypatch)
        slow = await query_shard(s, sql, [])
        assert fast.schema == slow.schema
        assert fast.to_pylist() == slow.to_pylist()
        assert reads[0] <= 250, f"{sql}: read {reads[0]} keys"  # only future Scheduled rows
    _run(body)


def test_datafusion_gets_one_row_per_counter_not_per_job():
    """Regression guard: with 700 jobs in the tenant the jobs table handed to DataFusion
    has a handful of rows, and no job row is read from storage."""
    async def body(shards, clock):
        [s] = shards
        sql = "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'big' GROUP BY 1"
        planned = engine.plan(sql, [])
        with ranges.count_reads() as reads:
            tables = await engine.read_shard(s, planned, s.now())
        jobs = tables["jobs"]
        assert jobs.num_rows == 4  # Succeeded, Failed, Waiting, Scheduled
        assert jobs.schema == counted.WEIGHTED_JOBS
        assert sum(jobs.column(counted.WEIGHT).to_pylist()) == BIG
        assert reads[0] <= BIG // 7 + 5  # the future Scheduled index rows (Waiting split)
        sql = "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'big'"
        with ranges.count_reads() as reads:
            tables = await engine.read_shard(s, engine.plan(sql, []), s.now())
            assert (await query_shard(s, sql, [])).to_pylist() == [{"n": BIG}]
        assert tables["jobs"].num_rows <= 4 and reads[0] == 0
    _run(body)


@pytest.mark.parametrize("sql", [
    "SELECT COUNT(*) OVER () AS n FROM jobs WHERE tenant = 'acme'",
    "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' AND priority > 10",
    "SELECT status_kind, COUNT(*) FILTER (WHERE tenant = 'acme') AS n FROM jobs GROUP BY 1",
    "SELECT COUNT(id) AS n FROM jobs WHERE tenant = 'acme'",
    "SELECT COUNT(*) AS n FROM (SELECT status_kind, COUNT(*) AS __silo_counted_jobs "
    "FROM jobs GROUP BY 1)",
    "SELECT status_kind, MIN(status_changed_at_ms) AS t FROM jobs GROUP BY 1",
    "SELECT a.status_kind, COUNT(*) AS n FROM jobs a JOIN jobs b ON a.id = b.id GROUP BY 1",
    "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'acme' GROUP BY 1 "
    "UNION ALL SELECT 'tasks', COUNT(*) FROM tasks",
])
def test_statements_that_need_job_rows_keep_the_per_job_path(sql, monkeypatch):
    async def body(shards, clock):
        [s] = shards
        assert engine.plan(sql, []).weighted_sql is None, sql
        got = (await query_shard(s, sql, [])).to_pylist()
        _per_job(monkeypatch)
        want = (await query_shard(s, sql, [])).to_pylist()
        assert sorted(map(repr, got)) == sorted(map(repr, want))
    _run(body)


def test_rewrite_leaves_quoted_text_alone():
    text, n = counted.rewrite_count_calls(
        "SELECT 'count(*)', \"COUNT(*)\", COUNT( * ), count(1), counter(*) FROM jobs")
    assert n == 2
    assert text == ("SELECT 'count(*)', \"COUNT(*)\", coalesce(sum(__silo_counted_jobs), 0), "
                    "coalesce(sum(__silo_counted_jobs), 0), counter(*) FROM jobs")


@pytest.mark.parametrize("sql", [STATEMENTS[0], STATEMENTS[3], STATEMENTS[4], STATEMENTS[5]])
def test_counts_across_shards_are_exact(sql, monkeypatch):
    """The per-counter rows of every shard are concatenated before DataFusion sums them
    (as silo.query.cluster does), so the answer is the count over all shards' jobs."""
    async def body(shards, clock):
        async def read(planned):
            return [await engine.read_shard(s, planned, s.now()) for s in shards]

        fast = await engine.run_statement([s.id for s in shards], sql, [], read)
        assert engine.plan(sql, []).weighted_sql is not None
        _per_job(monkeypatch)
        slow = await engine.run_statement([s.id for s in shards], sql, [], read)
        assert fast.to_pylist() == slow.to_pylist()
        if "tenant, status_kind" in sql:
            big = {r["status_kind"]: r["c"] for r in fast.to_pylist() if r["tenant"] == "big"}
            assert sum(big.values()) == BIG + BIG - 100
    _run(body, shards=2)
