"""The group committer's two SlateDB calls per commit, made straight through the FFI.

Every commit with `flush_on_commit` is `db.write(batch)` then
`db.flush_with_options(FlushOptions(flush_type=WAL))`. Through the generated bindings
each one lowers its arguments in Python (the FlushOptions record through the generic
RustBufferBuilder: a context manager, a reserve and four packed fields per commit),
allocates a fresh RustCallStatus and RustBuffer per call, lifts a WriteHandle object the
committer never uses (and whose `__del__` makes one more FFI call to free it), and goes
through `silo.storage.wake`'s generic `rust_call_async`. Measured with py-spy on
`bench/commit_cost.py` those wrappers were about a quarter of the Python thread's time
per commit.

`CommitCalls` makes the same Rust calls with the same arguments and byte formats:

* `write(batch)`: `clone_db` + `clone_writebatch` (the generated lowering of `self` and
  of the batch), `method_db_write` to start the future, the C poll of
  `silo.storage._wake` until it is ready, `rust_future_complete_u64` (checked with the
  bindings' own `_uniffi_check_call_status` and error converter, so a failure raises the
  same `slatedb.uniffi.Error`), `free_writehandle` on the returned handle at once, and
  `rust_future_free_u64` in `finally` (also on cancellation), as the generated code does;
* `flush_wal()`: the FlushOptions argument lowered once at construction (its bytes
  kept), then per call one `rustbuffer_from_bytes` of those bytes, `clone_db`,
  `method_db_flush_with_options`, the same poll, complete and free (`_void` variants).

The synchronous calls that keep the GIL (`clone_*`, `rustbuffer_from_bytes`) are all on
`silo.storage.ffi.GIL_HOLDING_SYMBOLS`; everything that starts, completes or frees a
future, or frees a write handle, releases it, as in the generated bindings.

Only used where `silo.storage.wake` delivers completions on the running loop (the
server's workers) and the bindings are the version `silo.storage.ffi` patched;
`available_for(db)` says so, and the committer falls back to the generated calls
otherwise (fake databases in tests, other versions).
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Coroutine
from types import ModuleType

from silo.storage import ffi, wake

_POLL_READY = wake._POLL_READY
_POLL_WAKE = wake._POLL_WAKE

_made: dict[str, object] = {}  # the process's bound functions, made once


def _bound(mod: ModuleType) -> dict[str, object]:
    """The FFI functions CommitCalls uses, with a plain-address call status: `keep` ones
    through PyDLL (GIL kept, as `ffi.apply(hold_gil=True)` does for the same symbols),
    the others through CDLL (GIL released)."""
    if _made:
        return _made
    lib = mod._UniffiLib
    keep = ctypes.PyDLL(lib._name)
    release = ctypes.CDLL(lib._name)
    u64, addr, rb = ctypes.c_uint64, ctypes.c_void_p, mod._UniffiRustBuffer
    signatures = {
        # name: (GIL kept, argtypes, restype)
        "uniffi_slatedb_uniffi_fn_clone_db": (True, (u64, addr), u64),
        "uniffi_slatedb_uniffi_fn_clone_writebatch": (True, (u64, addr), u64),
        "ffi_slatedb_uniffi_rustbuffer_from_bytes": (True, (ffi._ForeignBytesArg, addr), rb),
        "uniffi_slatedb_uniffi_fn_method_db_write": (False, (u64, u64), u64),
        "uniffi_slatedb_uniffi_fn_method_db_flush_with_options": (False, (u64, rb), u64),
        "ffi_slatedb_uniffi_rust_future_complete_u64": (False, (u64, addr), u64),
        "ffi_slatedb_uniffi_rust_future_free_u64": (False, (u64,), None),
        "ffi_slatedb_uniffi_rust_future_complete_void": (False, (u64, addr), None),
        "ffi_slatedb_uniffi_rust_future_free_void": (False, (u64,), None),
        "uniffi_slatedb_uniffi_fn_free_writehandle": (False, (u64, addr), None),
        "uniffi_slatedb_uniffi_fn_clone_writehandle": (True, (u64, addr), u64),
        "uniffi_slatedb_uniffi_fn_method_writehandle_await_durable": (False, (u64,), u64),
    }
    out: dict[str, object] = {}
    for name, (gil, argtypes, restype) in signatures.items():
        if gil and name not in ffi.GIL_HOLDING_SYMBOLS:
            raise RuntimeError(f"{name} is not a GIL-holding symbol")
        fn = getattr(keep if gil else release, name)
        fn.argtypes = argtypes
        fn.restype = restype
        out[name] = fn
    for name in ("u64", "void"):
        poll = getattr(lib, f"ffi_slatedb_uniffi_rust_future_poll_{name}")
        known = wake._poll_addresses.get(id(poll))
        if known is None or known[0] is not poll:
            raise RuntimeError(f"rust_future_poll_{name} is not patched by silo.storage.wake")
        out[f"poll_{name}"] = known[1]
    _made.update(out)
    return _made


def available_for(db) -> bool:
    """True if `db` is a slatedb Db of the patched bindings and completions of calls
    awaited on the running loop go through silo.storage.wake."""
    if not (wake.installed() and ffi.is_applied()):
        return False
    mod = ffi._bindings()
    return isinstance(db, mod.Db) and getattr(mod, wake._MARKER, False)


class CommitCalls:
    """`await write(batch)` and `await flush_wal()` on one database (see the module
    docstring). Build it on the loop that awaits the calls, after `wake.install()`."""

    __slots__ = ("_db", "_fns", "_status", "_sp", "_flush_arg", "_flush_bytes", "_mod",
                 "late_flushes")

    def __init__(self, db) -> None:
        mod = self._mod = ffi._bindings()
        self._db = db
        self._fns = _bound(mod)
        self._status = mod._UniffiRustCallStatus()
        self._sp = ctypes.addressof(self._status)
        lowered = mod._UniffiFfiConverterTypeFlushOptions.lower(
            mod.FlushOptions(flush_type=mod.FlushType.WAL))
        try:
            self._flush_bytes = ctypes.string_at(lowered.data, lowered.len)
        finally:
            lowered.free()
        self._flush_arg = ffi._ForeignBytesArg(len(self._flush_bytes), self._flush_bytes)
        self.late_flushes = 0  # confirm(): writes the early flush did not carry

    def _check(self, converter) -> None:
        """Raise the call's error as the generated code would, with a fresh status after."""
        status = self._status
        self._status = self._mod._UniffiRustCallStatus()
        self._sp = ctypes.addressof(self._status)
        self._mod._uniffi_check_call_status(converter, status)
        raise self._mod.InternalError(f"call failed with status {status.code}")

    def _clone_db(self) -> int:
        h = self._fns["uniffi_slatedb_uniffi_fn_clone_db"](self._db._handle, self._sp)
        if self._status.code:
            self._check(None)
        return h

    async def write(self, batch) -> bool:
        """db.write(batch), its WriteHandle freed at once. Returns True (the committer's
        marker of a written batch)."""
        handle = await self.write_started(batch)
        self._free_handle(handle)
        return True

    def write_started(self, batch) -> Coroutine[None, None, int]:
        """db.write(batch) with the future made and polled once now (which hands SlateDB's
        writer task the batch, unless it holds writers back); the coroutine returns the
        WriteHandle (its handle id: free it with _free_handle)."""
        f = self._fns
        try:
            db_h = self._clone_db()
            wb_h = f["uniffi_slatedb_uniffi_fn_clone_writebatch"](batch._handle, self._sp)
            if self._status.code:
                self._check(None)  # db_h leaks here, as in the generated code
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            return _raise(e)
        fut = f["uniffi_slatedb_uniffi_fn_method_db_write"](db_h, wb_h)
        try:
            first = _poll_once(fut, f["poll_u64"])
        except BaseException as e:  # noqa: BLE001
            f["ffi_slatedb_uniffi_rust_future_free_u64"](fut)
            return _raise(e)
        return self._finish_write(fut, first)

    async def _finish_write(self, fut: int, first) -> int:
        f = self._fns
        try:
            await _drive(self._mod, fut, f["poll_u64"],
                         self._mod._UniffiLib.ffi_slatedb_uniffi_rust_future_poll_u64, first)
            handle = f["ffi_slatedb_uniffi_rust_future_complete_u64"](fut, self._sp)
            if self._status.code:
                self._check(self._mod._UniffiFfiConverterTypeError)
            return handle
        finally:
            f["ffi_slatedb_uniffi_rust_future_free_u64"](fut)

    def _free_handle(self, handle: int) -> None:
        self._fns["uniffi_slatedb_uniffi_fn_free_writehandle"](handle, self._sp)
        if self._status.code:
            self._check(None)

    def write_flushing(self, batch) -> tuple[Coroutine[None, None, int],
                                             Coroutine[None, None, None]]:
        """Send db.write(batch) and, right behind it, the WAL flush, before either is
        awaited: SlateDB's writer task takes both from one queue in order, so the flush
        normally carries the write, and the flush no longer waits for the event loop to
        see the write's completion first (a loop pass and a thread hop per commit).
        Returns (the write's coroutine, giving the handle; the flush's coroutine); await
        the write first, then give both to confirm(), which checks the write really is
        durable."""
        return self.write_started(batch), self.flush_wal_started()

    async def confirm(self, flush: Coroutine[None, None, None], handle: int) -> None:
        """The write behind `handle` is durable once `flush` (sent behind it) returns, if
        SlateDB took the write first: its WriteHandle then says durable at once (a poll
        answered on this thread, no wait). If the flush went first (SlateDB held the
        write back under memory pressure before queueing it), flush again, now behind
        the write, and wait on the handle. Frees the handle."""
        try:
            await flush
            f = self._fns
            h = f["uniffi_slatedb_uniffi_fn_clone_writehandle"](handle, self._sp)
            if self._status.code:
                self._check(None)
            fut = f["uniffi_slatedb_uniffi_fn_method_writehandle_await_durable"](h)
            try:
                first = _poll_once(fut, f["poll_void"])
                if first is None or type(first[1]) is not int or first[1] != _POLL_READY:
                    self.late_flushes += 1
                    await self.flush_wal()
                await _drive(self._mod, fut, f["poll_void"],
                             self._mod._UniffiLib.ffi_slatedb_uniffi_rust_future_poll_void,
                             first)
                f["ffi_slatedb_uniffi_rust_future_complete_void"](fut, self._sp)
                if self._status.code:
                    self._check(self._mod._UniffiFfiConverterTypeError)
            finally:
                f["ffi_slatedb_uniffi_rust_future_free_void"](fut)
        finally:
            self._free_handle(handle)

    async def flush_wal(self) -> None:
        """db.flush_with_options(FlushOptions(flush_type=FlushType.WAL))."""
        await self.flush_wal_started()

    def flush_wal_started(self) -> Coroutine[None, None, None]:
        """flush_wal() with the request already on its way: the future is made and polled
        once now (which sends SlateDB's writer the flush), and the returned coroutine
        awaits the rest. The committer's durability task starts one loop pass after the
        write returns; the flush no longer waits for that pass. Any error is raised by
        the coroutine, as flush_wal() would."""
        f = self._fns
        try:
            db_h = self._clone_db()
            arg = f["ffi_slatedb_uniffi_rustbuffer_from_bytes"](self._flush_arg, self._sp)
            if self._status.code:
                self._check(None)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            return _raise(e)
        fut = f["uniffi_slatedb_uniffi_fn_method_db_flush_with_options"](db_h, arg)
        first = None
        try:
            first = _poll_once(fut, f["poll_void"])
        except BaseException as e:  # noqa: BLE001
            f["ffi_slatedb_uniffi_rust_future_free_void"](fut)
            return _raise(e)
        return self._finish_flush(fut, first)

    async def _finish_flush(self, fut: int, first) -> None:
        f = self._fns
        try:
            await _drive(self._mod, fut, f["poll_void"],
                         self._mod._UniffiLib.ffi_slatedb_uniffi_rust_future_poll_void, first)
            f["ffi_slatedb_uniffi_rust_future_complete_void"](fut, self._sp)
            if self._status.code:
                self._check(self._mod._UniffiFfiConverterTypeError)
        finally:
            f["ffi_slatedb_uniffi_rust_future_free_void"](fut)


async def _raise(e: BaseException) -> None:
    raise e


def _poll_once(rust_future: int, address: int):
    """Poll once through silo.storage.wake: (data, code) if answered during the poll,
    (data, an asyncio future the drain resolves) if not, or None without a wake on the
    running loop (then _drive polls the generated way)."""
    loop = asyncio.get_running_loop()
    w = wake._wakes.get(loop)
    if w is None or not w.native.attached:
        return None
    data = w.base | next(wake._tokens)
    code = wake._wake.poll(address, rust_future, data)
    if code is None:
        fut = loop.create_future()
        w.futures[data] = fut
        return data, fut
    return data, code


async def _drive(mod: ModuleType, rust_future: int, address: int, ffi_poll,
                 first=None) -> None:
    """Poll rust_future until it is ready: silo.storage.wake's loop (same tokens, queue
    and streak), or the generated one if the loop's wake is not (or no longer)
    installed. `first`: the result of a _poll_once already made."""
    loop = asyncio.get_running_loop()
    w = wake._wakes.get(loop)
    while True:
        if w is None or not w.native.attached:
            if first is not None:  # a poll is pending on the queue: wait for it first
                data, got = first
                if type(got) is not int:
                    try:
                        await got
                    except BaseException:
                        if w is not None:
                            w.futures.pop(data, None)
                        raise
            await wake._counted(wake._poll_generated(mod, loop, rust_future, ffi_poll))
            return
        if first is None:
            first = _poll_once(rust_future, address)
            if first is None:
                continue  # uninstalled meanwhile
        data, got = first
        first = None
        if type(got) is int:
            code = got
            if code == _POLL_WAKE or w.streak >= wake.SYNC_STREAK:
                # Answered during the poll: give the loop its pass (see wake.py).
                w.streak = 0
                await asyncio.sleep(0)
            else:
                w.streak += 1
        else:
            try:
                code = await got
            except BaseException:
                w.futures.pop(data, None)
                raise
        if code == _POLL_READY:
            return
