"""Round-trip tests for the slatedb binding patches in ``silo.storage.ffi``.

Everything runs with the patches applied (they are process-wide); the encoding checks
compare against the UniFFI wire format spelled out by hand (big-endian ``i32`` length
prefix + raw bytes, ``struct`` formats for scalars), which is what the generated
per-byte loops produced.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import logging
import random
import struct

import pytest

from silo.storage import ffi

ffi.apply()

from slatedb.uniffi import DbBuilder, KeyRange, ObjectStore, WriteBatch  # noqa: E402

MIB = 1 << 20
VALUE_SIZES = (0, 1, 300, 3000, MIB, 5 * MIB)
KEY_SIZES = (1, 2, 300, 3000, 17, 65535)  # keys cannot be empty; 0 is checked separately
ALL_KEYS = KeyRange(start=None, start_inclusive=True, end=None, end_inclusive=False)

PREFIX = b"p"


def _bindings():
    return ffi._bindings()


def _payload(rng: random.Random, size: int) -> bytes:
    """Random bytes of ``size`` that contain NULs (first/last byte, and in between)."""
    if size == 0:
        return b""
    data = bytearray(rng.randbytes(size))
    data[0] = 0
    data[-1] = 0
    data[size // 2] = 0
    return bytes(data)


def _key(rng: random.Random, size: int) -> bytes:
    return PREFIX + _payload(rng, size - 1) if size > 1 else PREFIX


def _rows(seed: int = 1234) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    rows = {_key(rng, k): _payload(rng, v) for k, v in zip(KEY_SIZES, VALUE_SIZES, strict=True)}
    assert len(rows) == len(VALUE_SIZES)
    return rows


def _buffer_bytes(rbuf) -> bytes:
    if rbuf.len == 0:
        return b""
    return ctypes.string_at(ctypes.addressof(rbuf.data.contents), rbuf.len)


def _store_and_path(kind: str, tmp_path):
    if kind == "memory":
        return ObjectStore.resolve("memory:///"), "test-db"
    return ObjectStore.resolve("file:///"), str(tmp_path / "db").lstrip("/")


async def _scan_all(db, prefix: bytes) -> dict[bytes, bytes]:
    it = await db.scan_prefix(prefix, ALL_KEYS)
    out: dict[bytes, bytes] = {}
    while True:
        batch = await it.next_batch(2)
        if not batch:
            return out
        for kv in batch:
            assert kv.key not in out
            out[kv.key] = kv.value


# ----------------------------------------------------------------------------- apply()


def test_apply_is_idempotent_and_marks_module():
    mod = _bindings()
    builder_cls = mod._UniffiRustBufferBuilder
    before = (
        builder_cls.write,
        builder_cls._pack_into,
        mod._UniffiFfiConverterBytes.__dict__["lower"],
        mod._UniffiFfiConverterBytes.__dict__["write"],
    )
    ffi.apply()
    ffi.apply()
    after = (
        builder_cls.write,
        builder_cls._pack_into,
        mod._UniffiFfiConverterBytes.__dict__["lower"],
        mod._UniffiFfiConverterBytes.__dict__["write"],
    )
    assert before == after
    assert ffi.is_applied()
    # The per-byte loops are gone.
    assert builder_cls.write.__module__ == ffi.__name__
    assert builder_cls._pack_into.__module__ == ffi.__name__


def test_apply_with_other_version_warns_and_changes_nothing(monkeypatch, caplog):
    mod = _bindings()
    write_before = mod._UniffiRustBufferBuilder.write
    lib_fn_before = mod._UniffiLib.ffi_slatedb_uniffi_rustbuffer_alloc
    monkeypatch.setattr(ffi, "_installed_version", lambda: "0.18.0")
    with caplog.at_level(logging.WARNING, logger=ffi.__name__):
        ffi.apply(hold_gil=True)
    assert any("0.18.0" in r.getMessage() for r in caplog.records)
    assert mod._UniffiRustBufferBuilder.write is write_before
    assert mod._UniffiLib.ffi_slatedb_uniffi_rustbuffer_alloc is lib_fn_before


def test_gil_holding_list_is_safe():
    for name in ffi.GIL_HOLDING_SYMBOLS:
        assert "rust_future" not in name
        assert "callback" not in name
        assert "merge" not in name
        assert "free_db" not in name


# ------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("size", [0, 1, 5, 300, 3000, 70_000])
def test_bytes_lower_wire_format(size):
    mod = _bindings()
    data = _payload(random.Random(size), size)
    for value in (data, bytearray(data), memoryview(data)):
        rbuf = mod._UniffiFfiConverterBytes.lower(value)
        try:
            assert _buffer_bytes(rbuf) == struct.pack(">i", size) + data
        finally:
            rbuf.free()


def test_builder_write_and_pack_wire_format():
    mod = _bindings()
    blob = _payload(random.Random(7), 5000)
    with mod._UniffiRustBuffer.alloc_with_builder() as builder:
        builder.write_u8(1)
        builder.write_i32(-2)
        builder.write_u64(2**64 - 1)
        builder.write_double(1.5)
        builder.write(b"")
        builder.write(b"abc\x00")
        builder.write(bytearray(b"\x00xyz"))
        builder.write(memoryview(b"0123456789")[::3])  # non-contiguous view
        mod._UniffiFfiConverterBytes.write(blob, builder)  # nested Bytes (Option/record)
        mod._UniffiFfiConverterString.write("héllo\x00", builder)
        rbuf = builder.finalize()
    expected = (
        struct.pack(">B", 1)
        + struct.pack(">i", -2)
        + struct.pack(">Q", 2**64 - 1)
        + struct.pack(">d", 1.5)
        + b"abc\x00"
        + b"\x00xyz"
        + b"0369"
        + struct.pack(">i", len(blob))
        + blob
        + struct.pack(">i", len("héllo\x00".encode()))
        + "héllo\x00".encode()
    )
    try:
        assert _buffer_bytes(rbuf) == expected
        # And the (unpatched) reader gets the same values back.
        stream = mod._UniffiRustBufferStream.from_rust_buffer(rbuf)
        assert stream.read_u8() == 1
        assert stream.read_i32() == -2
        assert stream.read_u64() == 2**64 - 1
        assert stream.read_double() == 1.5
        assert stream.read(4 + 4 + 4) == b"abc\x00\x00xyz0369"
        assert mod._UniffiFfiConverterBytes.read(stream) == blob
        assert mod._UniffiFfiConverterString.read(stream) == "héllo\x00"
        assert stream.remaining() == 0
    finally:
        rbuf.free()


def test_pack_out_of_range_raises_without_corrupting():
    mod = _bindings()
    with mod._UniffiRustBuffer.alloc_with_builder() as builder:
        builder.write_u8(7)
        with pytest.raises(struct.error):
            builder.write_u8(256)
        builder.write_u8(8)
        rbuf = builder.finalize()
    try:
        assert _buffer_bytes(rbuf) == b"\x07\x08"
    finally:
        rbuf.free()


def test_multibyte_buffer_is_sent_as_raw_bytes():
    mod = _bindings()
    arr = array.array("i", [1, -1, 0x01020304])
    rbuf = mod._UniffiFfiConverterBytes.lower(arr)
    try:
        assert _buffer_bytes(rbuf) == struct.pack(">i", arr.itemsize * 3) + arr.tobytes()
    finally:
        rbuf.free()


# --------------------------------------------------------------------------- database


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_round_trip_sizes(kind, tmp_path):
    rows = _rows()
    store, path = _store_and_path(kind, tmp_path)

    async def main():
        db = await DbBuilder(path, store).build()
        try:
            wb = WriteBatch()
            for k, v in rows.items():
                wb.put(k, v)
            h = await db.write(wb)
            await h.await_durable()
            for k, v in rows.items():
                got = await db.get(k)
                assert got is not None
                assert len(got) == len(v)
                assert got == v
            assert await db.get(PREFIX + b"\x00missing") is None
            assert await _scan_all(db, PREFIX) == rows
        finally:
            await db.shutdown()

    asyncio.run(main())


def test_bytes_like_arguments_and_delete():
    data = b"v\x00lue" * 3

    async def main():
        db = await DbBuilder("bytes-like", ObjectStore.resolve("memory:///")).build()
        try:
            wb = WriteBatch()
            wb.put(b"k-bytes", data)
            wb.put(bytearray(b"k-bytearray"), bytearray(data))
            wb.put(memoryview(b"k-memoryview"), memoryview(data))
            wb.put(memoryview(b"xk-slicex")[1:-1], memoryview(bytearray(data))[2:7])
            wb.put(b"k-gone", b"x")
            wb.delete(bytearray(b"k-gone"))
            h = await db.write(wb)
            await h.await_durable()
            assert await db.get(b"k-bytes") == data
            assert await db.get(bytearray(b"k-bytearray")) == data
            assert await db.get(memoryview(b"k-memoryview")) == data
            assert await db.get(b"k-slice") == data[2:7]
            assert await db.get(b"k-gone") is None
            assert await _scan_all(db, b"k-") == {
                b"k-bytes": data,
                b"k-bytearray": data,
                b"k-memoryview": data,
                b"k-slice": data[2:7],
            }
        finally:
            await db.shutdown()

    asyncio.run(main())


def test_batch_writer_fills_a_batch_like_put_and_delete():
    """The one-loop fill (silo.storage.db's hot path) writes exactly what the generated
    put/delete would: empty, binary and large values, deletes of present keys."""
    writes = {b"k-empty": b"", b"k-bin": bytes(range(256)), b"k-big": b"x" * 100_000,
              b"k-gone": None, b"k\x00nul": b"\x00v", b"k-1": b"1",
              b"k" + bytes(range(256)) * 4: b"long key"}
    fill = ffi.batch_writer()

    async def main():
        db = await DbBuilder("batch-writer", ObjectStore.resolve("memory:///")).build()
        try:
            wb = WriteBatch()
            wb.put(b"k-gone", b"old")
            h = await db.write(wb)
            await h.await_durable()
            wb = WriteBatch()
            fill(wb, writes)
            h = await db.write(wb)
            await h.await_durable()
            assert await _scan_all(db, b"k") == {k: v for k, v in writes.items()
                                                 if v is not None}
        finally:
            await db.shutdown()

    asyncio.run(main())


def test_batch_writer_errors_lift_and_leave_the_batch_usable():
    """An invalid key raises the bindings' own error (lifted from Rust's status), and the
    fill of a later batch still works: nothing was left half-owned."""
    fill = ffi.batch_writer()
    wb = WriteBatch()
    with pytest.raises(Exception, match="empty"):
        fill(wb, {b"ok": b"v", b"": b"v"})
    with pytest.raises(Exception, match="empty"):
        fill(WriteBatch(), {b"": None})
    with pytest.raises(TypeError):
        fill(WriteBatch(), {"not-bytes": b"v"})

    async def main():
        db = await DbBuilder("batch-writer-err", ObjectStore.resolve("memory:///")).build()
        try:
            wb = WriteBatch()
            fill(wb, {b"k-after": b"v"})
            h = await db.write(wb)
            await h.await_durable()
            assert await db.get(b"k-after") == b"v"
        finally:
            await db.shutdown()

    asyncio.run(main())


def test_errors_still_lift():
    wb = WriteBatch()
    with pytest.raises(Exception, match="empty"):
        wb.put(b"", b"v")
    with pytest.raises(TypeError):
        wb.put("not-bytes", b"v")  # type: ignore[arg-type]


_HOLD_GIL_SCRIPT = r"""
import asyncio, os, threading, time
from silo.storage import ffi
ffi.apply(hold_gil=True)
ffi.apply(hold_gil=True)
assert ffi.gil_holding_applied()
from slatedb.uniffi import DbBuilder, KeyRange, ObjectStore, WriteBatch

stop = False
def busy():  # competes for the GIL the whole time, like grpc's poller thread
    while not stop:
        time.sleep(0)
        sum(range(50))
t = threading.Thread(target=busy, daemon=True)
t.start()

async def main():
    db = await DbBuilder("gil", ObjectStore.resolve("memory:///")).build()
    rows = {b"g%03d" % i: os.urandom(i * 37) + b"\x00" for i in range(200)}
    async def writer(part):
        wb = WriteBatch()
        for k in part:
            wb.put(k, rows[k])
        h = await db.write(wb)
        await h.await_durable()
    keys = sorted(rows)
    await asyncio.gather(*(writer(keys[i::8]) for i in range(8)))
    got = await asyncio.gather(*(db.get(k) for k in keys))
    assert got == [rows[k] for k in keys]
    it = await db.scan_prefix(b"g", KeyRange(start=None, start_inclusive=True, end=None, end_inclusive=False))
    scanned = {}
    while batch := await it.next_batch(64):
        scanned.update((kv.key, kv.value) for kv in batch)
    assert scanned == rows
    fill = ffi.batch_writer()  # the GIL-keeping (PyDLL) fill
    wb = WriteBatch()
    fill(wb, {b"g000": None, b"h-empty": b"", b"h-bin": b"\x00" * 70})
    h = await db.write(wb)
    await h.await_durable()
    assert await db.get(b"g000") is None
    assert await db.get(b"h-empty") == b""
    assert await db.get(b"h-bin") == b"\x00" * 70
    await db.shutdown()

asyncio.run(main())
stop = True
print("ok")
"""


def test_hold_gil_mode_round_trip_in_subprocess():
    """``apply(hold_gil=True)`` is process-wide, so exercise it in a child process
    (with a thread competing for the GIL and concurrent async calls whose continuation
    callbacks arrive on Tokio threads); a deadlock would show up as the timeout."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _HOLD_GIL_SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
