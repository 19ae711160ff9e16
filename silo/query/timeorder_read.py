"""Reading a job-list page from a time-ordered index: about n rows per shard.

For a scan timeorder.served() accepts, each tenant contributes index ranges whose rows
sort newest first by the page's time: in enqueue order the metadata time index (0x11)
for a metadata key = value, else the enqueue-time index (0x10) of each task group
asked for, or of every task group the tenant has (found by skipping from one group's
rows to the next: one short read per group); in status order the status index (0x03) rows of each
status word (Waiting and Scheduled split at now). A keyset cursor starts each range at
its time. The ranges are merged by time and each candidate is confirmed by its status
and info rows (status words, task group, metadata, the cursor's tie-break); reading
stops once n are confirmed and every candidate tied with the n-th on time is in.
DataFusion then sorts, filters and limits what was read, as always, so the read only
has to hold the statement's first n rows: every row that ranks among them has a time
at least the n-th's.

A "newer" page (keyset with the order ascending) reads the same ranges backwards from
its cursor (SlateDB's descending scan), oldest first, so it costs what an older page does.

A status filter alone walks the tenant's index only when that is cheaper than reading
every job of that status from the status index (timeorder.walk_status_cheaper, from the
status counters): a rare status (Running, Failed) keeps the status-index read.
"""

from __future__ import annotations

import asyncio
import heapq

from silo.query import ranges, timeorder
from silo.query.plan import Scan
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import job_info_decoder, job_status_decoder

_Raw = tuple[bytes, bytes | None, bytes | None]
MIN_CONFIRM = 16  # candidates confirmed per round trip at least


class _Cursor:
    """One index range read in slices: the head candidate's (enqueue_ms, job_id)."""

    def __init__(self, shard: Shard, tenant: str, prefix: bytes, start: bytes,
                 end: bytes | None, slice_: int, descending: bool) -> None:
        self.tenant = tenant
        self.plen = len(prefix)
        self._it = ranges.rows(shard.db, start, end, slice_, descending)
        self._buf: list = []
        self._pos = 0
        self.done = False

    async def head(self) -> tuple[int, str] | None:
        if self._pos >= len(self._buf):
            if self.done:
                return None
            try:
                self._buf, self._pos = await anext(self._it), 0
            except StopAsyncIteration:
                self.done = True
                return None
        return keys.decode_time_tail(self._buf[self._pos].key, self.plen)

    def pop(self) -> None:
        self._pos += 1

    async def close(self) -> None:
        await self._it.aclose()


_Source = tuple[str, bytes, bytes, bytes | None]  # (tenant, prefix, start, end)


async def _groups(shard: Shard, tenant: str) -> list[str]:
    """The task groups with 0x10 rows of a tenant: one single-row read per group."""
    base = keys.tenant_groups_prefix(tenant)
    end = keys.prefix_end(base)
    start: bytes | None = base
    out: list[str] = []
    while start is not None:
        it = ranges.rows(shard.db, start, end, 1)
        try:
            batch = await anext(it, None)
        finally:
            await it.aclose()
        if not batch:
            break
        group, _ = keys.dec_str(batch[0].key, len(base))
        out.append(group)
        start = keys.prefix_end(keys.group_time_prefix(tenant, group))
    return out


async def _sources(shard: Shard, scan: Scan, source: str, tenant: str, now: int
                   ) -> list[_Source]:
    """The index ranges of one tenant whose rows (prefix + time + job id) hold the
    scan's candidates newest first."""
    if source == "status":
        out = []
        for word in sorted(scan.statuses or ()):
            if word in ("Waiting", "Scheduled"):
                base = keys.status_index_prefix(tenant, "Scheduled")
                split = keys.status_index(tenant, "Scheduled", now, "")
                out.append((tenant, base, split, keys.prefix_end(base)) if word == "Waiting"
                           else (tenant, base, base, split))
            else:
                p = keys.status_index_prefix(tenant, word)
                out.append((tenant, p, p, keys.prefix_end(p)))
        return out
    if scan.meta_exact is not None:
        ps = [keys.metadata_time_prefix(tenant, *scan.meta_exact)]
    elif scan.job_groups is not None:
        ps = [keys.group_time_prefix(tenant, g) for g in sorted(scan.job_groups)]
    else:
        ps = [keys.group_time_prefix(tenant, g) for g in await _groups(shard, tenant)]
    return [(tenant, p, p, keys.prefix_end(p)) for p in ps]


def _bounds(src: _Source, ks: timeorder.Keyset | None) -> tuple[bytes, bytes | None]:
    """The part of a range a page may need: all, or the rows at or beyond the cursor's
    time (older: from it on; newer: up to it, read backwards)."""
    _, prefix, start, end = src
    if ks is None:
        return start, end
    at = keys.time_index_from(prefix, ks.ms)  # the rows at time ks.ms start here
    if ks.older:
        return max(start, at), end
    upto = keys.prefix_end(at)
    return start, upto if end is None or (upto is not None and upto < end) else end


def _status_words_count(shard: Shard, scan: Scan, tenants: list[str]) -> tuple[int, int]:
    """(jobs whose stored status can show one of scan.statuses, all jobs) of tenants."""
    stored = {"Scheduled" if w in ("Waiting", "Scheduled") else w
              for w in scan.statuses or ()}
    matching = total = 0
    wanted = set(tenants)
    for (t, st), n in list(shard.tenant_status.items()):
        if t in wanted and n > 0:
            total += n
            matching += n if st in stored else 0
    return matching, total


async def _confirm(shard: Shard, scan: Scan, now: int, cands: list[tuple[str, str, int]],
                   together: bool) -> list[_Raw]:
    """The raw rows of the candidates (tenant, job_id, ms) that match every filter;
    together: read status and info rows at once (no status walk)."""
    from silo.query.scan import status_word  # noqa: PLC0415 - scan.py calls us

    db = shard.db
    admitted = [c for c in cands if scan.keyset is None
                or scan.keyset.admits(c[2], c[1], shard.id)]
    if not admitted:
        return []
    status_keys = [keys.job_status(t, j) for t, j, _ in admitted]
    if together:  # most candidates match: both reads at once, one round trip
        raw_status, raw_info_all = await asyncio.gather(
            ranges.gets(db, status_keys),
            ranges.gets(db, [keys.job_info(t, j) for t, j, _ in admitted]))
    else:  # a status walk: most candidates are dropped on their status row
        raw_status, raw_info_all = await ranges.gets(db, status_keys), None
    kept = []
    infos: list[bytes | None] = []
    for i, (c, rs) in enumerate(zip(admitted, raw_status, strict=True)):
        if rs is None:
            continue  # deleted meanwhile
        if scan.statuses is not None and status_word(
                job_status_decoder.decode(rs), now) not in scan.statuses:
            continue
        kept.append((c, rs))
        if raw_info_all is not None:
            infos.append(raw_info_all[i])
    raw_info = (infos if raw_info_all is not None else
                await ranges.gets(db, [keys.job_info(t, j) for (t, j, _), _ in kept]))
    out: list[_Raw] = []
    for ((t, j, _), rs), ri in zip(kept, raw_info, strict=True):
        if ri is None:
            continue
        if scan.job_groups is not None or scan.meta_exact is not None:
            info = job_info_decoder.decode(ri)
            if scan.job_groups is not None and info.task_group not in scan.job_groups:
                continue
            if scan.meta_exact is not None and (
                    info.metadata.get(scan.meta_exact[0]) != scan.meta_exact[1]):
                continue
        out.append((keys.job_status(t, j)[1:], rs, ri))
    return out


async def read_jobs(shard: Shard, scan: Scan, tenants: list[str], now: int
                    ) -> list[_Raw] | None:
    """The raw rows of a job-list page of this shard, or None: not the list's shape (or
    a status the status index serves more cheaply); the caller reads as before."""
    source = timeorder.served(scan)
    if source is None:
        return None
    assert scan.limit is not None
    n = scan.limit
    if (source == "enqueue" and scan.statuses is not None and scan.meta_exact is None
            and scan.job_groups is None):
        matching, total = _status_words_count(shard, scan, tenants)
        if not timeorder.walk_status_cheaper(n, matching, total):
            return None
    ks = scan.keyset
    newest_first = ks is None or ks.older
    per_tenant = await asyncio.gather(*(_sources(shard, scan, source, t, now)
                                        for t in tenants))
    srcs = [src for part in per_tenant for src in part]
    if not srcs:
        return []
    slice_ = max(1, min(ranges.SLICE, n // len(srcs) + 1))
    cursors = [_Cursor(shard, src[0], src[1], *_bounds(src, ks), slice_, not newest_first)
               for src in srcs]
    try:
        together = source == "status" or scan.statuses is None
        return await _merge(shard, scan, now, cursors, n, -1 if newest_first else 1,
                            together)
    finally:
        for c in cursors:
            await c.close()


async def _merge(shard: Shard, scan: Scan, now: int, cursors: list[_Cursor],
                 n: int, sign: int, together: bool) -> list[_Raw]:
    """Candidates newest first (sign -1; oldest first: 1) across the ranges, confirmed
    in rounds; stop once n are confirmed and the next candidate's enqueue time differs
    from the n-th confirmed one's."""
    heads = await asyncio.gather(*(c.head() for c in cursors))  # the first reads at once
    heap = [(sign * h[0], i) for i, h in enumerate(heads) if h is not None]  # (sign·ms, i)
    heapq.heapify(heap)
    out: list[_Raw] = []
    last_ms: int | None = None  # enqueue time of the n-th confirmed row
    while heap:
        want = max(n - len(out), min(MIN_CONFIRM, n))
        batch: list[tuple[str, str, int]] = []
        while heap and len(batch) < want:
            key, i = heap[0]
            if last_ms is not None and sign * key != last_ms:
                heap.clear()  # older than the n-th: nothing further can rank
                break
            c = cursors[i]
            h = await c.head()
            assert h is not None
            batch.append((c.tenant, h[1], h[0]))
            c.pop()
            nxt = await c.head()
            if nxt is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (sign * nxt[0], i))
        got = await _confirm(shard, scan, now, batch, together)
        ms_of = {(keys.job_status(t, j)[1:]): ms for t, j, ms in batch}
        for r in got:
            out.append(r)
            if len(out) == n:
                last_ms = ms_of[r[0]]
    return out
