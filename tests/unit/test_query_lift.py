"""silo.query.lift: a scan slice read as (key, value) pairs gives exactly the keys and
values the binding's own `next_batch` lifts, for any row shape (empty, binary, long,
with and without an expiry), and bad buffers are refused rather than misread."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slatedb.uniffi import DbBuilder, KeyRange, ObjectStore, WriteBatch

from silo.query import lift

mod = lift._mod
needs_binding = pytest.mark.skipif(mod is None, reason="slatedb bindings of another version")

_rows = st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=3000),
                           st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1),
                           st.none() | st.integers(-(2**63), 2**63 - 1)), max_size=40)


def _serialised(rows) -> bytes:
    """The bytes the binding would lift for these rows, written by its own writer."""
    kvs = [mod.KeyValue(key=k, value=v, seq=s, create_ts=c, expire_ts=e)
           for k, v, s, c, e in rows]
    rbuf = mod._UniffiFfiConverterSequenceTypeKeyValue.lower(kvs)
    try:
        return rbuf.data[0 : rbuf.len] if rbuf.len else b""
    finally:
        rbuf.free()


@needs_binding
@settings(max_examples=150, deadline=None)
@given(_rows)
def test_parse_pairs_matches_the_binding(rows):
    data = _serialised(rows)
    kvs = mod._UniffiFfiConverterSequenceTypeKeyValue.read(
        mod._UniffiRustBufferStream(data, len(data)))
    assert lift.parse_pairs(data) == [(kv.key, kv.value) for kv in kvs]
    assert lift.parse_pairs(data) == [(k, v) for k, v, *_ in rows]


@needs_binding
@given(_rows.filter(bool))
@settings(max_examples=50, deadline=None)
def test_truncated_or_padded_buffers_are_refused(rows):
    data = _serialised(rows)
    with pytest.raises((ValueError, IndexError, struct.error)):
        lift.parse_pairs(data[:-1])
    with pytest.raises(ValueError):
        lift.parse_pairs(data + b"\x00")


def test_a_real_iterator_gives_the_same_rows_as_next_batch():
    rows = {b"k%04d" % i: bytes([i % 256]) * (i % 50) for i in range(300)}

    async def main():
        db = await DbBuilder("lift", ObjectStore.resolve("memory:///")).build()
        try:
            wb = WriteBatch()
            for k, v in rows.items():
                wb.put(k, v)
            await (await db.write(wb)).await_durable()
            kr = KeyRange(start=b"k", start_inclusive=True, end=b"l", end_inclusive=False)
            a, b = await db.scan(kr), await db.scan(kr)
            assert mod is None or type(a) is mod.DbIterator  # the fast path is taken
            fast, slow = [], []
            while batch := await lift.next_pairs(a, 64):
                fast += batch
            while batch := await b.next_batch(64):
                slow += [(bytes(r.key), bytes(r.value)) for r in batch]
            return fast, slow
        finally:
            await db.shutdown()

    fast, slow = asyncio.run(main())
    assert fast == slow == sorted(rows.items())
    assert all(type(kv) is lift.KV for kv in fast)


def test_other_iterators_go_through_their_own_next_batch():
    class Row:
        def __init__(self, k: bytes, v: bytes) -> None:
            self.key, self.value = k, v

    class It:
        async def next_batch(self, n):
            return [Row(b"a", b"1"), Row(b"b", b"2")][:n]

    got = asyncio.run(lift.next_pairs(It(), 1))
    assert got == [(b"a", b"1")] and got[0].key == b"a" and got[0].value == b"1"


def test_whole_range_reads_ask_for_read_ahead_and_short_reads_do_not():
    """ranges.rows: full slices read ahead (uncached blocks), a LIMIT's short slices
    and descending reads keep their own options."""
    from silo.query import ranges

    class Db:
        def __init__(self) -> None:
            self.opened: list = []

        async def scan(self, kr):
            self.opened.append(None)
            return Empty()

        async def scan_with_options(self, kr, options):
            self.opened.append(options)
            return Empty()

    class Empty:
        async def next_batch(self, n):
            return []

    async def drain(db, **kw):
        async for _ in ranges.rows(db, b"a", b"b", **kw):
            pass

    db = Db()
    asyncio.run(drain(db))
    asyncio.run(drain(db, slice_=5))
    asyncio.run(drain(db, descending=True))
    bulk, short, desc = db.opened
    assert bulk.read_ahead_bytes == ranges.READ_AHEAD_BYTES and not bulk.cache_blocks
    assert short is None
    assert desc is ranges._DESCENDING
