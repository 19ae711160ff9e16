"""Scans that outlive the SSTs they started on.

SlateDB's garbage collector deletes an SST that compaction replaced once it is older
than `storage.gc_sst_min_age_s` (60 s by default), whether or not an iterator opened
before the compaction still reads it. A scan longer than that (the index backfill of a
big layout-2 shard at open, the queue-depth count at open, a full-table query) then
fails with "object ... not found" although every row it wants is still there, in the
SST that replaced the deleted one. Measured: backfilling 1,000,000 jobs at open failed
this way after ~90 s.

`ResumingScan` keeps the last key it returned and, on that error, opens a new iterator
on the rest of the range (after that key, or before it when descending). The new
iterator reads the current manifest, so it sees the merged SSTs. Rows are never
returned twice or skipped; rows written after the scan began may or may not be seen,
as with any scan of a live shard.
"""

from __future__ import annotations

import logging

from slatedb.uniffi import KeyRange

log = logging.getLogger("silo.storage")

# How many times in a row, without a row read in between, one scan reopens before the
# error is passed on: then the store is really missing data, not a GC under a long scan.
MAX_RESUMES = 8


def is_missing_object(e: BaseException) -> bool:
    """Whether e is the object store's "not found" for a file SlateDB went to read."""
    text = str(e).lower()
    return "not found" in text and ("object" in text or ".sst" in text)


def rest_of_range(start: bytes, end: bytes | None, *, start_inclusive: bool,
                  last: bytes | None, descending: bool) -> KeyRange:
    """The part of [start, end) (start exclusive if not start_inclusive) a scan that
    returned `last` as its latest key has still to read."""
    if last is None:
        return KeyRange(start=start, start_inclusive=start_inclusive, end=end,
                        end_inclusive=False)
    if descending:
        return KeyRange(start=start, start_inclusive=start_inclusive, end=last,
                        end_inclusive=False)
    return KeyRange(start=last, start_inclusive=False, end=end, end_inclusive=False)


class ResumingScan:
    """An iterator over [start, end) with `next_batch(n)` like SlateDB's, reopened on
    the rest of the range when an SST under it was garbage-collected."""

    def __init__(self, db, start: bytes, end: bytes | None, *, start_inclusive: bool = True,
                 options=None, descending: bool = False) -> None:
        self._db = db
        self._start = start
        self._end = end
        self._start_inclusive = start_inclusive
        self._options = options
        self._descending = descending
        self._it = None
        self._last: bytes | None = None
        self.resumes = 0  # in all
        self._in_a_row = 0

    async def _open(self) -> None:
        kr = rest_of_range(self._start, self._end, start_inclusive=self._start_inclusive,
                           last=self._last, descending=self._descending)
        if self._options is None:
            self._it = await self._db.scan(kr)
        else:
            self._it = await self._db.scan_with_options(kr, self._options)

    async def begin(self) -> None:
        """Open the iterator now rather than at the first batch: what the scan reads is
        the database as of this call (a count that rows changed later must not reach)."""
        if self._it is None:
            await self._open()

    async def next_batch(self, n: int, fetch=None) -> list:
        """Up to n rows (rows with .key); `fetch(iterator, n)`, when given, reads them
        instead of the iterator's own next_batch (silo.query.lift: key/value only)."""
        while True:
            try:
                if self._it is None:
                    await self._open()
                rows = await (self._it.next_batch(n) if fetch is None
                              else fetch(self._it, n))
            except Exception as e:
                if not is_missing_object(e) or self._in_a_row >= MAX_RESUMES:
                    raise
                self.resumes += 1
                self._in_a_row += 1
                self._it = None
                log.info("a scan lost an SST to garbage collection (%s); resuming after "
                         "the last key it read (resume %d)", e, self.resumes)
                continue
            if rows:
                self._last = bytes(rows[-1].key)
                self._in_a_row = 0
            return rows
