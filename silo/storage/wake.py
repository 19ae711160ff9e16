"""SlateDB completions delivered to the event loop without a Tokio thread entering Python.

Every awaited SlateDB call goes through the UniFFI bindings' ``_uniffi_rust_call_async``:
poll the Rust future with a continuation callback, await an asyncio future that the
callback resolves, poll again on POLL_WAKE, complete on POLL_READY. The generated
callback is a ctypes thunk, so when the future finishes on a Tokio thread, that thread
takes the GIL, builds a Python thread state (and drops it again: one per callback) and
calls ``loop.call_soon_threadsafe``. Under load SlateDB's completion threads spend their
time waiting for the GIL, and on CPython 3.11 the thread-state allocation is also a
crash: with tracemalloc on, ``PyMem_RawMalloc`` enters tracemalloc's hook, which waits
for the GIL; if the GIL holder calls ``tracemalloc.stop()`` meanwhile (HeapProfile), the
hook then writes through the freed traceback buffer (``traceback_new``, ``segfault at 8``;
fixed upstream in 3.12). ``tests/unit/test_wake_crash.py`` reproduces it.

:func:`install` (once per event loop, in the server's worker process) replaces that
path for calls awaited on that loop: ``silo.storage._wake.poll`` polls with a C
continuation that only queues ``(data, code)`` under a mutex and writes an eventfd; the
loop reads the eventfd (``add_reader``) and :meth:`_LoopWake.drain` resolves the waiting
futures. A poll that completes at once (a cached read) needs no future and no loop pass
at all. Calls on any other loop or thread, and every process without the C module, keep
the generated path unchanged. The patch is applied only to the bindings of
``slatedb`` :data:`silo.storage.ffi.SUPPORTED_VERSION`.

Edge cases, and why they are safe:

* A cancelled awaiting task forgets its token (``futures.pop``) and frees the Rust
  future in ``finally`` exactly as the generated code does; freeing calls the stored
  continuation once more, which is then a token nobody waits for and is ignored.
* Tokens come from one process-wide counter, so a completion for a closed loop's queue
  slot that has since been reused can never match a new waiter.
* Fork: the C side detaches every queue in the child; :func:`install` there makes a new
  one (the worker installs after the supervisor forked it).
* A closed or collected loop: the registry holds loops weakly; a closed loop's queue is
  detached by :func:`uninstall` or when it is collected.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from types import ModuleType

from silo.storage import ffi

try:
    from silo.storage import _wake
except ImportError:  # built as an optional extension (setup.py); pure-Python path then
    _wake = None  # type: ignore[assignment]

__all__ = ["available", "install", "installed", "stop_if_no_generated_calls", "uninstall"]

log = logging.getLogger(__name__)

_POLL_READY = 0  # UniFFI's RustFuturePoll::Ready
_POLL_WAKE = 1
_MARKER = "_silo_wake_patched"
# At most this many calls in a row answered during their poll (no await) before the
# awaiting task yields to the loop once.
SYNC_STREAK = 32

_tokens = itertools.count(1)  # 0 is drain()'s "some completions were lost" marker
_wakes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWake] = (
    weakref.WeakKeyDictionary())
# id(the bindings' poll function) → (that function, its address); ctypes functions are
# unhashable, and keeping the function itself makes a reused id impossible.
_poll_addresses: dict[int, tuple[object, int]] = {}


# SlateDB calls awaited through the generated path (a Tokio thread will enter Python to
# complete them) since the patch, counted for silo.observability.profiling; the lock
# also keeps a new one from starting while stop_if_no_generated_calls runs.
_generated_lock = threading.Lock()
_generated_in_flight = 0


def available() -> bool:
    """True if the C module is built and the installed bindings are the patched version."""
    return _wake is not None and ffi._installed_version() == ffi.SUPPORTED_VERSION


class _LoopWake:
    """One event loop's completion queue and the futures waiting on it."""

    __slots__ = ("__weakref__", "base", "futures", "native", "fd", "streak")

    def __init__(self) -> None:
        self.streak = 0  # calls answered during their poll since this loop last yielded
        self.native = _wake.Wake()
        self.base: int = self.native.base
        self.fd: int = self.native.fileno()
        self.futures: dict[int, asyncio.Future[int]] = {}

    def drain(self) -> None:
        pop = self.futures.pop
        for data, code in self.native.drain():
            if data == 0:  # the queue could not grow: wake everyone, they re-poll
                waiting, self.futures = self.futures, {}
                pop = self.futures.pop
                for fut in waiting.values():
                    if not fut.done():
                        fut.set_result(_POLL_WAKE)
                continue
            fut = pop(data, None)
            if fut is not None and not fut.done():
                fut.set_result(code)


def install(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Deliver SlateDB completions of calls awaited on `loop` (default: the running one)
    natively. Returns False (and changes nothing) without the C module, with other
    bindings, or when all MAX_QUEUES queues belong to live loops. Idempotent; call it in
    the process that runs the loop (after any fork)."""
    if not available():
        return False
    loop = loop or asyncio.get_running_loop()
    if loop in _wakes:
        return True
    ffi.apply()  # also checks the version; the patch below relies on the same bindings
    _patch(ffi._bindings())
    try:
        w = _LoopWake()
    except (RuntimeError, OSError):  # all slots taken (loops not yet collected?), no fd
        gc.collect()
        try:
            w = _LoopWake()
        except (RuntimeError, OSError) as e:
            log.warning("silo.storage.wake: %s; SlateDB completions on %r stay on the "
                        "generated path", e, loop)
            return False
    try:
        loop.add_reader(w.fd, w.drain)
    except BaseException:
        w.native.close()
        raise
    _wakes[loop] = w
    log.debug("silo.storage.wake: native SlateDB completions on %r", loop)
    return True


def uninstall(loop: asyncio.AbstractEventLoop) -> None:
    """Stop native completions on `loop` (before closing it): calls already waiting are
    woken to re-poll, which they then do through the generated path."""
    w = _wakes.pop(loop, None)
    if w is None:
        return
    if not loop.is_closed():
        loop.remove_reader(w.fd)
    w.drain()
    w.native.close()
    for fut in w.futures.values():
        if not fut.done():
            fut.set_result(_POLL_WAKE)
    w.futures.clear()


def installed(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """True if calls awaited on `loop` (default: the running one) complete natively."""
    try:
        loop = loop or asyncio.get_running_loop()
    except RuntimeError:
        return False
    return loop in _wakes


def stop_if_no_generated_calls(stop: Callable[[], None]) -> bool:
    """Run `stop` (tracemalloc.stop) and return True if no SlateDB call awaited through
    the generated path is in flight; no such call can start while it runs. Otherwise
    return False: the caller tries again later."""
    if not _generated_lock.acquire(blocking=False):
        return False
    try:
        if _generated_in_flight:
            return False
        stop()
        return True
    finally:
        _generated_lock.release()


async def _counted(call) -> object:
    global _generated_in_flight
    with _generated_lock:
        _generated_in_flight += 1
    try:
        return await call
    finally:
        with _generated_lock:
            _generated_in_flight -= 1


def _reset_after_fork() -> None:
    # The C side detached the queues; forget them so install() makes fresh ones.
    _wakes.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


_patch_lock = threading.Lock()


def _patch(mod: ModuleType) -> None:
    with _patch_lock:  # loops on two threads may install at once: wrap only once
        if not getattr(mod, _MARKER, False):
            _patch_locked(mod)


async def _poll_generated(mod: ModuleType, loop, rust_future, ffi_poll) -> None:
    """The generated poll loop (ctypes continuation, call_soon_threadsafe), for a call
    whose loop was uninstalled while it waited."""
    while True:
        fut = loop.create_future()
        ffi_poll(rust_future, mod._uniffi_continuation_callback,
                 mod._UniffiContinuationHandleMap.insert((loop, fut)))
        if await fut == _POLL_READY:
            return


def _patch_locked(mod: ModuleType) -> None:
    callback_t = mod._UNIFFI_RUST_FUTURE_CONTINUATION_CALLBACK
    lib = mod._UniffiLib
    for name in dir(lib):
        if not name.startswith("ffi_slatedb_uniffi_rust_future_poll_"):
            continue
        fn = getattr(lib, name)
        if (tuple(fn.argtypes or ()) != (ctypes.c_uint64, callback_t, ctypes.c_uint64)
                or fn.restype is not None):
            continue  # not the signature _wake.poll calls: leave it to the generated path
        _poll_addresses[id(fn)] = (fn, ctypes.cast(fn, ctypes.c_void_p).value)
    if not _poll_addresses:
        raise RuntimeError("no rust_future_poll_* function with the expected signature")

    generated = mod._uniffi_rust_call_async
    call_with_error = mod._uniffi_rust_call_with_error
    poll = _wake.poll
    running_loop = asyncio.get_running_loop
    wakes_get = _wakes.get
    addresses_get = _poll_addresses.get
    tokens = _tokens
    counted = _counted
    sleep0 = asyncio.sleep

    poll_generated = functools.partial(_poll_generated, mod)

    async def rust_call_async(rust_future, ffi_poll, ffi_complete, ffi_free, lift_func,
                              error_ffi_converter):
        loop = running_loop()
        w = wakes_get(loop)
        known = addresses_get(id(ffi_poll)) if w is not None else None
        if (known is None or known[0] is not ffi_poll
                or mod._UNIFFI_GLOBAL_EVENT_LOOP not in (None, loop)):
            return await counted(generated(rust_future, ffi_poll, ffi_complete, ffi_free,
                                           lift_func, error_ffi_converter))
        address = known[1]
        try:
            while True:
                data = w.base | next(tokens)
                code = poll(address, rust_future, data)
                if code is None:
                    fut = loop.create_future()
                    w.futures[data] = fut
                    try:
                        code = await fut
                    except BaseException:
                        w.futures.pop(data, None)  # a late completion is then ignored
                        raise
                elif code == _POLL_WAKE or w.streak >= SYNC_STREAK:
                    # Answered during the poll: give the loop its pass, as the generated
                    # path always does. A future that woke itself (a yield, Tokio's coop
                    # budget) is not re-polled in a tight loop that starves the loop
                    # while Tokio threads make the progress; a run of ready-at-once calls
                    # (a long scan) still lets other tasks in every SYNC_STREAK calls.
                    w.streak = 0
                    await sleep0(0)
                else:
                    w.streak += 1
                if code == _POLL_READY:
                    break
                if not w.native.attached:  # uninstalled meanwhile: the generated way
                    await counted(poll_generated(loop, rust_future, ffi_poll))
                    break
            return lift_func(call_with_error(error_ffi_converter, ffi_complete, rust_future))
        finally:
            ffi_free(rust_future)

    rust_call_async.__doc__ = "silo.storage.wake: " + (generated.__doc__ or "")
    # rust_call_async's poll loop is repeated in CommitCalls._drive (the committer's
    # calls), not shared: an extra coroutine frame on every read is not worth it.
    mod._uniffi_rust_call_async = rust_call_async
    setattr(mod, _MARKER, True)
