"""Reading a scan slice as (key, value) pairs, without the binding's per-field lifting.

Profiled (cProfile, full scan of a 100,000-job tenant, 200,000 rows): the generated
UniFFI code lifted each row of `DbIterator.next_batch` into a `KeyValue` dataclass
through seven Python-level reads (two byte strings, seq, create_ts, an optional
expire_ts), each a bounds check, a slice and a `struct.unpack` call — about half of the
loop thread's CPU for the whole statement. A statement needs only key and value: here
the slice's buffer is copied into Python once (`ctypes.string_at`) and walked with
`unpack_from`, the other fields skipped (their layout is fixed: u64, i64, then an
option tag and, if set, an i64).

The call is the generated `next_batch` with another lift function, so it is only used
with the exact binding version it was written against (as silo.storage.ffi); any other
version, or an iterator that is not the binding's (a test double), goes through the
ordinary `next_batch` and the rows are turned into the same pairs.
"""

from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple

from silo.storage import ffi


class KV(NamedTuple):
    """One row of a scan slice: what the query code reads of a `KeyValue`."""

    key: bytes
    value: bytes


_I32 = struct.Struct(">i")
_SKIP = 16  # seq (u64) + create_ts (i64)


def parse_pairs(data: bytes) -> list[KV]:
    """The rows of a serialised `Vec<KeyValue>` (UniFFI's big-endian layout)."""
    unpack = _I32.unpack_from
    (count,) = unpack(data, 0)
    if count < 0:
        raise ValueError("negative sequence length")
    off = 4
    out: list[KV] = []
    new = tuple.__new__
    for _ in range(count):
        (n,) = unpack(data, off)
        off += 4
        key = data[off : off + n]
        off += n
        (n,) = unpack(data, off)
        off += 4
        value = data[off : off + n]
        off += n + _SKIP
        tag = data[off]
        if tag > 1:
            raise ValueError("bad option tag for expire_ts")
        off += 9 if tag else 1
        out.append(new(KV, (key, value)))
    if off != len(data):
        raise ValueError(f"{len(data) - off} bytes left over after {count} rows")
    return out


def _lift(rbuf) -> list[KV]:
    try:
        data = ctypes.string_at(rbuf.data, rbuf.len) if rbuf.len else b""
    finally:
        rbuf.free()
    return parse_pairs(data)


def _fast_binding():
    if ffi._installed_version() != ffi.SUPPORTED_VERSION:
        return None
    try:
        mod = ffi._bindings()
        need = ("DbIterator", "_UniffiLib", "_uniffi_rust_call_async",
                "_UniffiFfiConverterUInt32", "_UniffiFfiConverterTypeError")
        return mod if all(hasattr(mod, n) for n in need) else None
    except ImportError:
        return None


_mod = _fast_binding()


async def next_pairs(it, n: int) -> list[KV]:
    """Up to n rows of the iterator as KV pairs (fewer, or none: it is exhausted)."""
    mod = _mod
    if mod is None or type(it) is not mod.DbIterator:
        return [KV(bytes(r.key), bytes(r.value)) for r in await it.next_batch(n)]
    lib = mod._UniffiLib
    mod._UniffiFfiConverterUInt32.check_lower(n)
    return await mod._uniffi_rust_call_async(
        lib.uniffi_slatedb_uniffi_fn_method_dbiterator_next_batch(
            it._uniffi_clone_handle(), mod._UniffiFfiConverterUInt32.lower(n)),
        lib.ffi_slatedb_uniffi_rust_future_poll_rust_buffer,
        lib.ffi_slatedb_uniffi_rust_future_complete_rust_buffer,
        lib.ffi_slatedb_uniffi_rust_future_free_rust_buffer,
        _lift,
        mod._UniffiFfiConverterTypeError,
    )
