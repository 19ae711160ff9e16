"""The jobs table built column by column (scan._build_jobs decodes only the columns a
statement reads; a full scan needing no status column reads no status rows) returns
exactly the rows of the same columns taken from SELECT *, for any column subset."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from silo.query import ranges
from silo.query.engine import query_shard
from silo.query.schema import TABLES
from silo.shard import enqueue as enq
from silo.shard.state import Shard, ShardConfig
from silo.storage.records import ConcurrencyLimit, JobInfo

N = 300
COLUMNS = [c for c in TABLES["jobs"].names if c != "metadata"]  # a map: not orderable


async def _with_shard(body):
    s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                         ShardConfig(commit_interval_ms=0, flush_interval_ms=1))
    try:
        for i in range(N):
            lims = [ConcurrencyLimit(f"q{i % 3}", 2)] if i % 4 == 0 else []
            enq._stage(s, JobInfo(f"j{i:04d}", "t", i % 100, 1000 + i, b"\x81\xa1a\x01",
                                  None, {"k": f"v{i % 7}"}, lims, f"g{i % 2}"))
        await s.committer.commit()
        return await body(s)
    finally:
        await s.close()


def _rows(table) -> list[tuple]:
    cols = table.to_pydict()
    return list(zip(*cols.values(), strict=True))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=5, unique=True))
def test_a_projection_returns_the_columns_of_select_star(cols):
    sel = ", ".join(cols)

    async def body(s):
        star = await query_shard(s, "SELECT * FROM jobs WHERE tenant = 't' ORDER BY id", [])
        part = await query_shard(s, f"SELECT {sel} FROM jobs WHERE tenant = 't' ORDER BY id",
                                 [])
        return star.select(cols), part

    star, part = asyncio.run(_with_shard(body))
    assert part.num_rows == N
    assert _rows(part) == _rows(star)
    assert part.schema.types == star.schema.types


def test_a_scan_without_status_columns_reads_only_the_info_rows():
    async def body(s):
        with ranges.count_reads() as info_only:
            a = await query_shard(s, "SELECT id, priority FROM jobs WHERE tenant = 't' "
                                     "AND priority >= 0 ORDER BY id", [])
        with ranges.count_reads() as both:
            b = await query_shard(s, "SELECT id, priority, status_kind FROM jobs WHERE "
                                     "tenant = 't' AND priority >= 0 ORDER BY id", [])
        return a, info_only[0], b, both[0]

    a, info_only, b, both = asyncio.run(_with_shard(body))
    assert info_only == N and both == 2 * N
    assert _rows(a) == _rows(b.select(["id", "priority"]))
    assert set(b.column("status_kind").to_pylist()) == {"Waiting"}


def test_a_job_met_in_two_index_ranges_is_one_row_even_chunks_apart(monkeypatch):
    """A job whose status changed between two range reads is met in both: one row."""
    from silo.query import scan

    real = ranges.index_ranges
    monkeypatch.setattr(scan, "BUILD_CHUNK", 7)  # the duplicates land in other chunks
    monkeypatch.setattr(scan.ranges, "index_ranges",
                        lambda sc, tenants, now: (r := real(sc, tenants, now)) and r + r)

    async def body(s):
        return await query_shard(s, "SELECT id FROM jobs WHERE tenant = 't' AND "
                                    "status_kind = 'Waiting'", [])

    got = asyncio.run(_with_shard(body)).column("id").to_pylist()
    assert sorted(got) == [f"j{i:04d}" for i in range(N)]
