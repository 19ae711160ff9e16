"""Which storage keys a jobs scan reads, and reading them in slices.

A Scan (plan.py) that pins down ids, a metadata key = value or prefix, or status words
becomes a list of key ranges of the 0x03/0x04 indexes (`index_ranges`), each yielding
(tenant, job_id) candidates. When a LIMIT reaches the scan (`pushable_limit`) and the
ranges select exactly the rows the statement filters on, only the first rows of each
range are read: enough that n of them are confirmed by their status row, plus the rows
tied with the n-th on the sort column when the LIMIT takes the top of an ORDER BY that
equals the index order (newest first within a status). DataFusion still sorts and
limits what was read, so reading n per range is sound for several tenants or statuses.

Every key read by a statement is counted when a `count_reads()` block is active, so a
test (and bench/query.py) can see what a query costs in storage reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import NamedTuple

from slatedb.uniffi import DurabilityLevel, IterationOrder, ScanOptions

from silo.query import lift, pace
from silo.query.plan import Scan
from silo.storage import keys
from silo.storage.scan import ResumingScan

SLICE = 128  # rows per storage read: a few ms of lifting and decoding, then pace
POINT_GROUP = 128
_reads: ContextVar[list[int] | None] = ContextVar("silo_query_reads", default=None)


@contextlib.contextmanager
def count_reads() -> Iterator[list[int]]:
    """`with count_reads() as n:` … `n[0]` keys (range rows and point reads) read."""
    box = [0]
    token = _reads.set(box)
    try:
        yield box
    finally:
        _reads.reset(token)


def _count(n: int) -> None:
    box = _reads.get()
    if box is not None:
        box[0] += n


# A scan's options as db.scan has them, iterating from the end of the range.
_DESCENDING = ScanOptions(durability_filter=DurabilityLevel.MEMORY, dirty=False,
                          read_ahead_bytes=1, cache_blocks=True, max_fetch_tasks=1,
                          order=IterationOrder.DESCENDING)

# A whole-range read (full slices, ascending): db.scan's defaults (no block caching, so
# a big scan does not evict the hot path's blocks) but SlateDB fetches the next blocks
# while the statement lifts and converts a slice. One 100k-job full scan (SELECT *,
# in process, loaded box, alternating runs): 3.6-4.3 s wall / 1.7-1.9 s CPU with the
# defaults (read_ahead_bytes=1, max_fetch_tasks=1), 2.4-3.5 s / 1.1-1.2 s with these.
# Short reads (a LIMIT's first rows, probes) keep the defaults: no blocks read ahead
# that they would not use.
READ_AHEAD_BYTES = 1 << 20
_ASCENDING_BULK = ScanOptions(durability_filter=DurabilityLevel.MEMORY, dirty=False,
                              read_ahead_bytes=READ_AHEAD_BYTES, cache_blocks=False,
                              max_fetch_tasks=2)


async def rows(db, start: bytes, end: bytes | None, slice_: int = SLICE,
               descending: bool = False) -> AsyncIterator[list]:
    """Rows (lift.KV: key, value) with start <= key < end, a slice per await (last key
    first if descending)."""
    options = _DESCENDING if descending else _ASCENDING_BULK if slice_ >= SLICE else None
    it = ResumingScan(db, start, end, options=options,
                      descending=descending)
    while True:
        batch = await it.next_batch(slice_, lift.next_pairs)
        if not batch:
            return
        _count(len(batch))
        yield batch
        await pace.tick()


async def prefix_rows(db, prefix: bytes, slice_: int = SLICE) -> AsyncIterator[list]:
    async for batch in rows(db, prefix, keys.prefix_end(prefix), slice_):
        yield batch


async def gets(db, ks: list[bytes]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for i in range(0, len(ks), POINT_GROUP):
        part = ks[i : i + POINT_GROUP]
        _count(len(part))
        out += await asyncio.gather(*(db.get(k) for k in part))
        await pace.tick()
    return out


# ---- index ranges ------------------------------------------------------------------


class Range(NamedTuple):
    """Index rows start <= key < end of one tenant; `decode` gives (job_id, ts)."""

    tenant: str
    start: bytes
    end: bytes | None
    decode: Callable[[bytes], tuple[str, int]]


def _status_row(key: bytes) -> tuple[str, int]:
    _, _, ts, job_id = keys.decode_status_index(key)
    return job_id, ts


def _metadata_row(key: bytes) -> tuple[str, int]:
    return keys.decode_metadata_index(key)[3], 0


def index_ranges(scan: Scan, tenants: list[str], now: int) -> list[Range] | None:
    """The index ranges holding the scan's candidates (None: no index applies; ids are
    point reads, see read_jobs)."""
    out: list[Range] = []
    if scan.meta_exact is not None or scan.meta_prefix is not None:
        for t in tenants:
            if scan.meta_exact is not None:
                prefix = keys.metadata_index_prefix(t, *scan.meta_exact)
            else:
                assert scan.meta_prefix is not None
                prefix = keys.metadata_value_prefix(t, *scan.meta_prefix)
            out.append(Range(t, prefix, keys.prefix_end(prefix), _metadata_row))
        return out
    if scan.statuses is not None:
        for t in tenants:
            for word in sorted(scan.statuses):
                if word in ("Waiting", "Scheduled"):
                    base = keys.status_index_prefix(t, "Scheduled")
                    split = keys.status_index(t, "Scheduled", now, "")
                    start, end = ((split, keys.prefix_end(base)) if word == "Waiting"
                                  else (base, split))
                else:
                    start = keys.status_index_prefix(t, word)
                    end = keys.prefix_end(start)
                out.append(Range(t, start, end, _status_row))
        return out
    return None


def sort_column(word: str) -> str:
    """The column the 0x03 index orders a status' rows by (newest first)."""
    return "next_attempt_starts_after_ms" if word in ("Waiting", "Scheduled") else (
        "status_changed_at_ms")


def pushable_limit(scan: Scan) -> tuple[int, bool] | None:
    """(n, ordered) when reading the first n rows of each range (of each tenant's job
    rows, without an index) gives every row the statement's LIMIT can return; ordered:
    rows tied with the n-th on the index's time must be read too."""
    n = scan.limit
    if n is None or scan.other_filters or scan.ids is not None:
        return None
    metas = (scan.meta_exact is not None) + (scan.meta_prefix is not None)
    if metas:
        ok = metas == 1 and scan.statuses is None and scan.order is None
        return (n, False) if ok else None
    if scan.order is None:
        return n, False
    if scan.statuses is None:
        return None
    cols = {sort_column(w) for w in scan.statuses}
    return (n, True) if len(cols) == 1 and scan.order[0] == (cols.pop(), True) else None


async def limited_candidates(db, r: Range, n: int, ordered: bool,
                             confirm: Callable[[list[tuple[str, str]]], Awaitable[list]]
                             ) -> list:
    """Read r in slices of about n rows; `confirm` (awaitable) turns candidates into the
    raw rows that still match. Stop once n are confirmed and, when ordered, the next
    index row's time differs from the n-th's."""
    out: list = []
    last_ts: int | None = None
    slice_ = max(1, min(SLICE, n))
    async for batch in rows(db, r.start, r.end, slice_):
        decoded = [r.decode(row.key) for row in batch]
        if len(out) >= n:  # only ties with the n-th row may still belong
            decoded = [d for d in decoded if d[1] == last_ts] if ordered else []
            if not decoded:
                break
        got = await confirm([(r.tenant, j) for j, _ in decoded])
        for (_, ts), raw in zip(decoded, got, strict=True):
            if raw is not None:
                out.append(raw)
                if len(out) == n:
                    last_ts = ts
        if len(out) >= n and (not ordered or decoded[-1][1] != last_ts):
            break
    return out
