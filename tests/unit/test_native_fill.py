"""The C WriteBatch fill (silo/storage/_fill.c) against the pure Python one.

Both come from ``silo.storage.ffi.batch_writer`` (``native=True`` / ``native=False``) and
must be indistinguishable: the same database contents for any writes, the same exception
(type and message) for any bad input or failing Rust call, and the same entries already
appended when one is raised. Every machine of ours has gcc, so the extension being
missing is a failure here, not a skip.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silo.storage import ffi

ffi.apply()

from slatedb.uniffi import DbBuilder, KeyRange, ObjectStore, WriteBatch  # noqa: E402

ALL_KEYS = KeyRange(start=None, start_inclusive=True, end=None, end_inclusive=False)


def test_the_c_fill_is_built_and_is_the_default():
    """setup.py builds silo/storage/_fill.c; batch_writer() hands out the C fill."""
    from silo.storage import _fill  # noqa: F401 - fails if the extension was not built

    assert ffi.batch_writer().impl == "c"
    assert ffi.batch_writer(native=True).impl == "c"
    assert ffi.batch_writer(native=False).impl == "python"


def test_without_the_extension_the_pure_fill_is_used(monkeypatch):
    """A machine without a compiler still works: batch_writer() falls back to the pure
    fill, and only native=True insists."""
    import silo.storage

    monkeypatch.setitem(sys.modules, "silo.storage._fill", None)  # import raises
    monkeypatch.delattr(silo.storage, "_fill", raising=False)
    assert ffi.batch_writer().impl == "python"
    with pytest.raises(ImportError, match="not built"):
        ffi.batch_writer(native=True)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def dbs(loop):
    """One database per fill, each on its own in-memory store."""
    async def open_(name):
        return await DbBuilder(name, ObjectStore.resolve("memory:///")).build()

    pair = {impl: loop.run_until_complete(open_(f"native-fill-{impl}"))
            for impl in ("c", "python")}
    yield pair
    for db in pair.values():
        loop.run_until_complete(db.shutdown())


FILLS = {"c": ffi.batch_writer(native=True), "python": ffi.batch_writer(native=False)}


async def _write(db, batch) -> None:
    handle = await db.write(batch)
    await handle.await_durable()


async def _scan(db, prefix: bytes) -> dict[bytes, bytes]:
    it = await db.scan_prefix(prefix, ALL_KEYS)
    out: dict[bytes, bytes] = {}
    while rows := await it.next_batch(256):
        out.update((kv.key, kv.value) for kv in rows)
    return out


class _Bytes(bytes):
    """A bytes subclass: the C fill leaves it (and what follows) to the pure loop."""


class _Dict(dict):
    """A dict subclass: the C fill leaves the whole batch to the pure loop."""


def _shaped(data: bytes, kind: str):
    """data as one of the bytes-like kinds the fills accept."""
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "sliced":  # a contiguous view into the middle of a larger object
        return memoryview(b"<<" + data + b">>")[2:len(data) + 2]
    if kind == "char":  # byte-sized items of format 'c'
        return memoryview(data).cast("c")
    if kind == "subclass":
        return _Bytes(data)
    return data


KINDS = ("bytes", "bytes", "bytes", "bytearray", "memoryview", "sliced", "char", "subclass")
payloads = st.one_of(
    st.binary(max_size=200),
    st.just(b""),
    st.builds(lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=3),
              st.integers(1_000, 70_000)),  # large values
)
entries = st.dictionaries(
    st.binary(min_size=1, max_size=80),
    st.one_of(st.none(), st.tuples(payloads, st.sampled_from(KINDS))),
    min_size=1,  # SlateDB refuses to write an empty batch
    max_size=40,
)
counter = itertools.count()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=entries, key_kinds=st.lists(st.sampled_from(("bytes", "memoryview", "subclass")),
                                           min_size=40, max_size=40),
       as_subclass=st.booleans())
def test_c_and_python_fills_write_identical_contents(loop, dbs, entries, key_kinds,
                                                      as_subclass):
    """Random keys and values (empty, large, bytearray, memoryviews, subclasses), deletes
    of keys that were there: both fills leave the same rows, and the rows the writes
    say."""
    prefix = b"e%06d/" % next(counter)
    writes = {}
    for (key, entry), kind in zip(entries.items(), key_kinds, strict=False):
        writes[_shaped(prefix + key, kind)] = None if entry is None else _shaped(*entry)
    if as_subclass:
        writes = _Dict(writes)
    expected = {prefix + k: e[0] for k, e in entries.items() if e is not None}

    async def run(impl):
        db = dbs[impl]
        old = WriteBatch()
        for key in entries:
            old.put(prefix + key, b"old")
        old.put(prefix + b"\xffuntouched", b"old")
        await _write(db, old)
        batch = WriteBatch()
        FILLS[impl](batch, writes)
        await _write(db, batch)
        return await _scan(db, prefix)

    got = {impl: loop.run_until_complete(run(impl)) for impl in FILLS}
    assert got["c"] == got["python"] == {**expected, prefix + b"\xffuntouched": b"old"}


def _released() -> memoryview:
    view = memoryview(b"released")
    view.release()
    return view


BAD_ENTRIES = {
    "empty key": (b"", b"v"),
    "empty key, delete": (b"", None),
    "str key": ("str", b"v"),
    "str value": (b"k-bad", "str"),
    "int value": (b"k-bad", 5),
    "strided view": (b"k-bad", memoryview(b"abcdef")[::2]),
    "released view": (b"k-bad", _released()),
    "int-format view": (b"k-bad", memoryview(b"abcdefgh").cast("i")),
    "2-d view": (b"k-bad", memoryview(b"abcdefgh").cast("B", (2, 4))),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_a_bad_entry_raises_the_same_error_after_the_same_entries(loop, dbs, case):
    """Whatever the pure fill raises for a bad entry (SlateDB's Error for an empty key,
    TypeError/ValueError for what is not bytes), the C fill raises the same, and the
    entries before it are in the batch in both (a shard never writes such a batch, but
    nothing of it is left dangling): writing both partial batches gives the same rows."""
    key, value = BAD_ENTRIES[case]
    prefix = f"bad-{case}/".encode()
    results = {}
    for impl, fill in FILLS.items():
        bad_key = key if isinstance(key, str) or key == b"" else prefix + key
        writes = {prefix + b"a": b"1", prefix + b"b": None, prefix + b"c": b"",
                  bad_key: value, prefix + b"d": b"after"}
        batch = WriteBatch()
        with pytest.raises(Exception) as raised:
            fill(batch, writes)
        loop.run_until_complete(_write(dbs[impl], batch))
        results[impl] = (type(raised.value), str(raised.value),
                         loop.run_until_complete(_scan(dbs[impl], prefix)))
    assert results["c"] == results["python"]
    assert results["c"][2] == {prefix + b"a": b"1", prefix + b"c": b""}


def test_a_consumed_batch_raises_the_same_error(loop, dbs):
    """Filling a batch already written: SlateDB's 'already consumed' error, the same."""
    errors = {}
    for impl, fill in FILLS.items():
        batch = WriteBatch()
        fill(batch, {b"consumed/a": b"1"})
        loop.run_until_complete(_write(dbs[impl], batch))
        with pytest.raises(Exception) as raised:
            fill(batch, {b"consumed/b": b"2"})
        errors[impl] = (type(raised.value), str(raised.value))
    assert errors["c"] == errors["python"]
    assert "consumed" in errors["c"][1]


def test_the_c_fill_checks_its_arguments():
    from silo.storage import _fill

    with pytest.raises(TypeError):
        _fill.Filler(1, 2, 3)
    with pytest.raises(ValueError, match="is 0"):
        _fill.Filler(1, 2, 0, 4, 5)
    with pytest.raises(TypeError):
        _fill.Filler(1, 2, 3, 4, "5")
    with pytest.raises(TypeError):
        _fill.Filler(1, 2, 3, 4, 5, clone=1)
    filler = _fill.Filler(1, 2, 3, 4, 5)  # never called through: the checks come first
    with pytest.raises(TypeError):
        filler.fill(1)
    with pytest.raises(OverflowError):
        filler.fill(-1, {})
    assert filler.fill(1, {}) is None  # nothing to do, nothing called
    assert filler.fill(1, _Dict()) == (0, 0, 0, 0, 0, 0)  # a subclass: Python's job


# ------------------------------------------------------------------ injected failures
# The Rust functions the C fill calls never fail on their own except put/delete (tested
# above with real errors). A stand-in library wraps the real ones, fails the Nth
# alloc/clone call on request (or breaks alloc's length contract) and keeps a ledger of
# the Rust buffers and batch handles the C fill owns: after every failure it must own
# none (each freed, or handed to put/delete, which consume them).

SHIM_C = r"""
#include <stdint.h>
#include <string.h>
typedef struct { uint64_t capacity, len; uint8_t *data; } RustBuffer;
typedef struct { int8_t code; RustBuffer error_buf; } RustCallStatus;
static uint64_t (*r_clone)(uint64_t, RustCallStatus *);
static RustBuffer (*r_alloc)(uint64_t, RustCallStatus *);
static void (*r_free)(RustBuffer, RustCallStatus *);
static void (*r_put)(uint64_t, RustBuffer, RustBuffer, RustCallStatus *);
static void (*r_del)(uint64_t, RustBuffer, RustCallStatus *);
long calls, fail_at, odd_at, live_buffers, live_handles;
int fail_code;
const char *fail_message;

void shim_bind(void *c, void *a, void *f, void *p, void *d)
{
    r_clone = c; r_alloc = a; r_free = f; r_put = p; r_del = d;
}
static int failing(RustCallStatus *st)
{
    if (++calls != fail_at)
        return 0;
    st->code = (int8_t)fail_code;
    if (fail_message) {
        RustCallStatus s = {0};
        size_t n = strlen(fail_message);
        st->error_buf = r_alloc(n, &s);
        memcpy(st->error_buf.data, fail_message, n);
    }
    return 1;
}
RustBuffer shim_alloc(uint64_t size, RustCallStatus *st)
{
    RustBuffer none = {0};
    if (failing(st))
        return none;
    live_buffers++;
    return r_alloc(calls == odd_at ? size + 1 : size, st);
}
void shim_free(RustBuffer b, RustCallStatus *st) { live_buffers--; r_free(b, st); }
uint64_t shim_clone(uint64_t h, RustCallStatus *st)
{
    if (failing(st))
        return 0;
    live_handles++;
    return r_clone(h, st);
}
void shim_put(uint64_t h, RustBuffer k, RustBuffer v, RustCallStatus *st)
{
    live_handles--; live_buffers -= 2; r_put(h, k, v, st);
}
void shim_del(uint64_t h, RustBuffer k, RustCallStatus *st)
{
    live_handles--; live_buffers--; r_del(h, k, st);
}
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    d = tmp_path_factory.mktemp("fill-shim")
    src, lib_path = d / "shim.c", d / "shim.so"
    src.write_text(SHIM_C)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-std=c11", "-Wall", "-o",
                    str(lib_path), str(src)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    mod = ffi._bindings()
    real = [ctypes.cast(getattr(mod._UniffiLib, name), ctypes.c_void_p).value
            for name in ffi._NATIVE_FILL_SYMBOLS]
    lib.shim_bind.argtypes = [ctypes.c_void_p] * 5
    lib.shim_bind(*real)
    stand_ins = tuple(ctypes.cast(getattr(lib, f"shim_{name}"), ctypes.c_void_p).value
                      for name in ("clone", "alloc", "free", "put", "del"))
    fill = ffi._native_batch_writer(mod, ffi._python_fill_items(mod), stand_ins)
    return lib, fill


def _set(lib, name: str, value) -> None:
    ctype = ctypes.c_int if name == "fail_code" else (
        ctypes.c_char_p if name == "fail_message" else ctypes.c_long)
    ctype.in_dll(lib, name).value = value


def _get(lib, name: str) -> int:
    return ctypes.c_long.in_dll(lib, name).value


SHIM_WRITES = {b"inj/a": b"1", b"inj/b": None, b"inj/c": b"", b"inj/d": b"x" * 5000}
CALLS_PER_ENTRY = (3, 2, 3, 3)  # alloc key (+ alloc value), then clone


def _entry_of_call(n: int) -> int:
    """The entry (0-based) whose lowering/clone is the nth (1-based) stand-in call."""
    for entry, calls in enumerate(CALLS_PER_ENTRY):
        if n <= calls:
            return entry
        n -= calls
    raise AssertionError(n)


FAILURES = {  # status code, message in its error buffer, the exception check() raises
    "call error": (1, b"freed unread", "CALL_ERROR, but error_ffi_converter is None"),
    "panic with message": (2, b"injected panic", "injected panic"),
    "panic without message": (2, None, "Unknown rust panic"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("fail_at", range(1, sum(CALLS_PER_ENTRY) + 1))
def test_a_failed_alloc_or_clone_raises_like_the_bindings_and_leaks_nothing(
        loop, dbs, shim, failure, fail_at):
    lib, fill = shim
    code, message, expected = FAILURES[failure]
    for name, value in (("calls", 0), ("fail_at", fail_at), ("odd_at", 0),
                        ("fail_code", code), ("fail_message", message),
                        ("live_buffers", 0), ("live_handles", 0)):
        _set(lib, name, value)
    batch = WriteBatch()
    with pytest.raises(ffi._bindings().InternalError) as raised:
        fill(batch, SHIM_WRITES)
    assert expected in str(raised.value)
    assert (_get(lib, "live_buffers"), _get(lib, "live_handles")) == (0, 0)
    # the entries before the failing one are in the batch, none after
    done = dict(itertools.islice(SHIM_WRITES.items(), _entry_of_call(fail_at)))
    if not done:  # SlateDB's refusal proves the batch empty
        with pytest.raises(Exception, match="empty write batch"):
            loop.run_until_complete(_write(dbs["c"], batch))
        return
    loop.run_until_complete(_write(dbs["c"], batch))
    got = loop.run_until_complete(_scan(dbs["c"], b"inj/"))
    assert got == {k: v for k, v in done.items() if v is not None}
    loop.run_until_complete(_write(dbs["c"], _deleting(SHIM_WRITES)))


@pytest.mark.parametrize("odd_at", [1, 2, 4, 6, 7, 9, 10])  # every alloc call, keys and values
def test_a_broken_alloc_length_hands_the_rest_to_python(loop, dbs, shim, odd_at):
    """An allocator that breaks its contract (len != size) is not trusted: the buffer is
    freed and the pure loop fills that entry and the rest; the batch is complete."""
    lib, fill = shim
    for name, value in (("calls", 0), ("fail_at", 0), ("odd_at", odd_at),
                        ("live_buffers", 0), ("live_handles", 0)):
        _set(lib, name, value)
    batch = WriteBatch()
    fill(batch, SHIM_WRITES)
    assert (_get(lib, "live_buffers"), _get(lib, "live_handles")) == (0, 0)
    loop.run_until_complete(_write(dbs["c"], batch))
    got = loop.run_until_complete(_scan(dbs["c"], b"inj/"))
    assert got == {k: v for k, v in SHIM_WRITES.items() if v is not None}
    loop.run_until_complete(_write(dbs["c"], _deleting(SHIM_WRITES)))


def _deleting(writes) -> WriteBatch:
    batch = WriteBatch()
    for key in writes:
        batch.delete(key)
    return batch


LEAK_SCRIPT = textwrap.dedent(r"""
    import resource
    from silo.storage import ffi
    ffi.apply()
    from slatedb.uniffi import WriteBatch
    fill = ffi.batch_writer(native=True)
    value = b"v" * 2000
    def errors(n):
        for _ in range(n):
            try:  # key and value lowered, handle cloned, then put fails
                fill(WriteBatch(), {b"k": value, b"": value})
            except Exception:
                pass
    errors(20_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    errors(100_000)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_rejected_puts_leak_nothing():
    """100,000 batches whose second put SlateDB rejects (its key and value lowered, the
    handle cloned, then the error status handed to Python): peak RSS stays put. Not
    freeing only the small error buffer grows it by ~7.8 MB, a lost value by ~200 MB."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", LEAK_SCRIPT], cwd=root, capture_output=True,
                         text=True, timeout=300, check=True)
    grown_kb = int(out.stdout.strip())
    assert grown_kb < 2_500, grown_kb
