"""ResumingScan: a scan whose SSTs the garbage collector deleted under it carries on
(silo/storage/scan.py). The real case (an index backfill of 1,000,000 jobs at open
failing after ~90 s with "compacted/....sst not found") depends on when SlateDB's
compactor and GC run; these tests inject that error into an iterator instead, so they
decide deterministically that the scan resumes after its last key, returns every row
once, passes other errors on and gives up when reopening makes no progress."""

from __future__ import annotations

import asyncio

import pytest

from silo.storage.scan import ResumingScan, rest_of_range


def test_rest_of_range_after_the_last_key():
    fwd = rest_of_range(b"a", b"z", start_inclusive=True, last=b"m", descending=False)
    assert (fwd.start, fwd.start_inclusive, fwd.end, fwd.end_inclusive) == \
        (b"m", False, b"z", False)
    back = rest_of_range(b"a", b"z", start_inclusive=True, last=b"m", descending=True)
    assert (back.start, back.start_inclusive, back.end, back.end_inclusive) == \
        (b"a", True, b"m", False)
    fresh = rest_of_range(b"a", None, start_inclusive=False, last=None, descending=False)
    assert (fresh.start, fresh.start_inclusive, fresh.end) == (b"a", False, None)


class _Flaky:
    """A db whose iterators raise `error` at their second batch, `times` times."""

    def __init__(self, rows: list[bytes], error: Exception, times: int) -> None:
        self.rows, self.error, self.times, self.opened = rows, error, times, []

    async def scan(self, kr):
        self.opened.append(kr)
        lo, hi = kr.start, kr.end
        got = [k for k in self.rows if (k > lo or (kr.start_inclusive and k == lo))
               and (hi is None or k < hi)]
        return _It(self, got)


class _It:
    def __init__(self, db: _Flaky, rows: list[bytes]) -> None:
        self.db, self.rows, self.calls = db, rows, 0

    async def next_batch(self, n: int):
        self.calls += 1
        if self.calls == 2 and self.db.times > 0:
            self.db.times -= 1
            raise self.db.error
        out, self.rows = self.rows[:n], self.rows[n:]
        return [type("KV", (), {"key": k})() for k in out]


MISSING = RuntimeError("Data error: object store error (Object at location /s/compacted/"
                       "01X.sst not found: No such file or directory (os error 2))")


async def drain(it) -> list[bytes]:
    out = []
    while batch := await it.next_batch(3):
        out.extend(r.key for r in batch)
    return out


def test_resumes_give_every_row_once_and_other_errors_pass():
    rows = [bytes([i]) for i in range(1, 20)]
    db = _Flaky(rows, MISSING, times=3)
    assert asyncio.run(drain(ResumingScan(db, b"\x00", None))) == rows
    assert len(db.opened) == 4
    other = _Flaky(rows, RuntimeError("permission denied"), times=1)
    with pytest.raises(RuntimeError, match="permission denied"):
        asyncio.run(drain(ResumingScan(other, b"\x00", None)))
    class _Dead(_Flaky):  # every iterator fails before its first row
        async def scan(self, kr):
            it = await super().scan(kr)
            it.calls = 1
            return it
    endless = _Dead(rows, MISSING, times=100)
    with pytest.raises(RuntimeError, match="not found"):
        asyncio.run(drain(ResumingScan(endless, b"\x00", None)))
