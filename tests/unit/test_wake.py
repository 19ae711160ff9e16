"""silo.storage.wake: SlateDB completions through the native queue (silo.storage._wake).

A fake UniFFI future (a ctypes poll function) drives the patched
`_uniffi_rust_call_async` exactly as the bindings do; completions arrive from other
threads through `_wake.complete`, which calls the same C continuation Rust would.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import tempfile
import threading

import pytest

from silo.storage import _wake, ffi, wake  # _wake: fails here if the extension is not built
from silo.storage.database import open_database

READY, WAKE = 0, 1


def bindings():
    ffi.apply()
    mod = ffi._bindings()
    wake._patch(mod)
    return mod


def test_the_native_wake_module_is_built():
    """Every machine of ours has gcc: the server must not run the crash-prone path."""
    assert _wake.Wake().base >= 0
    assert wake.available()


class FakeFutures:
    """Rust futures by handle: poll stores (continuation, data) or completes at once."""

    def __init__(self, mod, *, sync: bool = False, wakes_first: int = 0) -> None:
        cont_t = mod._UNIFFI_RUST_FUTURE_CONTINUATION_CALLBACK
        self.sync = sync
        self.wakes_first = wakes_first
        self.lock = threading.Lock()
        self.stored: dict[int, tuple] = {}  # handle → its stored (continuation, data)
        self.polls: dict[int, int] = {}
        self.freed: list[int] = []

        def poll(handle, callback, data):
            with self.lock:
                n = self.polls[handle] = self.polls.get(handle, 0) + 1
                if self.sync:
                    code = WAKE if n <= self.wakes_first else READY
                    callback(data, code)  # synchronously, like a ready Rust future
                else:
                    self.stored[handle] = (callback, data)

        def free(handle):
            with self.lock:
                self.freed.append(handle)
                stored = self.stored.pop(handle, None)
            if stored is not None:  # Rust's free cancels: the stored continuation runs
                stored[0](stored[1], WAKE)

        self.poll = ctypes.CFUNCTYPE(None, ctypes.c_uint64, cont_t, ctypes.c_uint64)(poll)
        self.free = free
        wake._poll_addresses[id(self.poll)] = (self.poll,
                                               ctypes.cast(self.poll, ctypes.c_void_p).value)

    def complete(self, handle: int, code: int = READY) -> bool:
        with self.lock:
            stored = self.stored.pop(handle, None)
        if stored is None:
            return False
        stored[0](stored[1], code)
        return True

    def data(self, handle: int) -> int:
        return self.stored[handle][1]


def call(mod, fakes: FakeFutures, handle: int):
    def complete(h, status):
        return h * 10

    return mod._uniffi_rust_call_async(handle, fakes.poll, complete, fakes.free,
                                       lambda v: v, None)


async def wait_for(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


def run(coro):
    return asyncio.run(coro)


def test_many_completions_from_many_threads_each_resolve_their_own_call():
    mod = bindings()

    async def main():
        assert wake.install()
        fakes = FakeFutures(mod)
        tasks = [asyncio.ensure_future(call(mod, fakes, h)) for h in range(1, 2001)]
        await wait_for(lambda: len(fakes.stored) == 2000)
        handles = list(fakes.stored)
        random.Random(7).shuffle(handles)

        def completer(part):
            for h in part:
                assert fakes.complete(h)

        threads = [threading.Thread(target=completer, args=(handles[i::4],))
                   for i in range(4)]
        for t in threads:
            t.start()
        results = await asyncio.gather(*tasks)
        for t in threads:
            t.join()
        assert results == [h * 10 for h in range(1, 2001)]
        assert sorted(fakes.freed) == list(range(1, 2001))
        assert wake._wakes[asyncio.get_running_loop()].futures == {}

    run(main())


def test_a_future_ready_at_once_needs_no_asyncio_future_and_wake_repolls():
    mod = bindings()

    async def main():
        assert wake.install()
        w = wake._wakes[asyncio.get_running_loop()]
        fakes = FakeFutures(mod, sync=True, wakes_first=2)
        assert await call(mod, fakes, 5) == 50
        assert fakes.polls[5] == 3  # WAKE, WAKE, READY: polled again each time
        assert w.futures == {}
        assert w.native.drain() == []  # nothing went through the queue

    run(main())


def test_a_cancelled_call_forgets_its_token_frees_once_and_ignores_a_late_completion():
    mod = bindings()

    async def main():
        assert wake.install()
        w = wake._wakes[asyncio.get_running_loop()]
        fakes = FakeFutures(mod)
        task = asyncio.ensure_future(call(mod, fakes, 9))
        await wait_for(lambda: 9 in fakes.stored)
        data = fakes.data(9)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert w.futures == {}
        assert fakes.freed == [9]
        # The cancel-on-free continuation and an even later one: both ignored.
        _wake.complete(data, READY)
        await asyncio.sleep(0.01)
        w.drain()
        assert w.futures == {}
        other = asyncio.ensure_future(call(mod, fakes, 10))
        await wait_for(lambda: 10 in fakes.stored)
        assert fakes.complete(10)
        assert await other == 100

    run(main())


def test_two_loops_in_two_threads_get_their_own_completions():
    mod = bindings()
    fakes = FakeFutures(mod)
    results: dict[str, list[int]] = {}
    started = threading.Barrier(3)

    def loop_thread(name, handles):
        async def main():
            assert wake.install()
            tasks = [asyncio.ensure_future(call(mod, fakes, h)) for h in handles]
            await wait_for(lambda: all(h in fakes.stored for h in handles))
            started.wait(10)
            results[name] = await asyncio.gather(*tasks)

        asyncio.run(main())

    a = threading.Thread(target=loop_thread, args=("a", range(1, 101)))
    b = threading.Thread(target=loop_thread, args=("b", range(101, 201)))
    a.start()
    b.start()
    started.wait(10)
    with fakes.lock:
        bases = {fakes.data(1) >> _wake.TOKEN_BITS, fakes.data(101) >> _wake.TOKEN_BITS}
    assert len(bases) == 2  # two queues
    for h in range(200, 0, -1):
        assert fakes.complete(h)
    a.join(10)
    b.join(10)
    assert results["a"] == [h * 10 for h in range(1, 101)]
    assert results["b"] == [h * 10 for h in range(101, 201)]


def test_a_loop_without_install_takes_the_generated_path():
    mod = bindings()

    async def main():
        assert not wake.installed()
        fakes = FakeFutures(mod)
        task = asyncio.ensure_future(call(mod, fakes, 3))
        await wait_for(lambda: 3 in fakes.stored)
        assert len(mod._UniffiContinuationHandleMap) == 1  # the bindings' own map
        assert fakes.complete(3)
        assert await task == 30

    run(main())


def test_uninstall_wakes_waiting_calls_which_finish_through_the_generated_path():
    mod = bindings()

    async def main():
        loop = asyncio.get_running_loop()
        assert wake.install()
        fakes = FakeFutures(mod)
        task = asyncio.ensure_future(call(mod, fakes, 4))
        await wait_for(lambda: 4 in fakes.stored)
        native_data = fakes.data(4)
        wake.uninstall(loop)
        assert not wake.installed()
        await wait_for(lambda: fakes.polls[4] == 2)  # re-polled with the generated callback
        _wake.complete(native_data, WAKE)  # its slot is detached: dropped
        assert fakes.complete(4)
        assert await task == 40
        assert fakes.freed == [4]

    run(main())


def test_lost_completions_wake_every_waiter_to_repoll():
    mod = bindings()

    async def main():
        assert wake.install()
        w = wake._wakes[asyncio.get_running_loop()]
        fakes = FakeFutures(mod)
        tasks = [asyncio.ensure_future(call(mod, fakes, h)) for h in (1, 2)]
        await wait_for(lambda: len(fakes.stored) == 2)
        real = w.native
        w.native = type("Lost", (), {"drain": lambda self: [(0, WAKE)],
                                     "attached": True})()
        fakes.stored.clear()  # their continuations are "lost"
        w.drain()
        w.native = real
        await wait_for(lambda: len(fakes.stored) == 2)  # both polled again
        for h in (1, 2):
            assert fakes.complete(h)
        assert await asyncio.gather(*tasks) == [10, 20]

    run(main())


def test_the_queue_is_detached_in_a_forked_child_and_install_makes_a_new_one():
    mod = bindings()
    r, wfd = os.pipe()

    async def parent():
        assert wake.install()
        old = wake._wakes[asyncio.get_running_loop()]
        pid = os.fork()
        if pid == 0:  # the child: no asyncio from the parent's loop, a new one
            code = 1
            try:
                ok = not old.native.attached and old.native.drain() == []

                async def child():
                    assert wake.install()
                    fakes = FakeFutures(mod)
                    task = asyncio.ensure_future(call(mod, fakes, 8))
                    await wait_for(lambda: 8 in fakes.stored)
                    fakes.complete(8)
                    return await task

                ok = ok and asyncio.new_event_loop().run_until_complete(child()) == 80
                code = 0 if ok else 2
            finally:
                os.write(wfd, bytes([code]))
                os._exit(code)
        os.close(wfd)
        _, status = os.waitpid(pid, 0)
        assert os.read(r, 1) == b"\x00"
        assert os.waitstatus_to_exitcode(status) == 0
        assert old.native.attached  # the parent's queue is untouched

    run(parent())


def test_slatedb_calls_on_an_installed_loop_never_run_the_ctypes_continuation():
    """The regression guard for the tracemalloc crash: with the wake installed, no
    SlateDB completion enters Python on a Tokio thread (the generated ctypes callback is
    the only way one can); without it, completions do (checks the detector works)."""
    mod = bindings()
    original = mod._uniffi_continuation_callback
    calls = []

    @mod._UNIFFI_RUST_FUTURE_CONTINUATION_CALLBACK
    def counting(data, code):
        calls.append(threading.get_ident())
        original(data, code)

    async def workload(native: bool) -> None:
        if native:
            assert wake.install()
        tmp = tempfile.mkdtemp()
        d = await open_database(f"file://{tmp}", "w", flush_interval_ms=10,
                                l0_sst_size_bytes=1 << 20)
        await asyncio.gather(*(d.put(b"k%d" % i, b"v" * 100) for i in range(200)))
        for i in range(200):
            assert await d.get(b"k%d" % i) == b"v" * 100
        await d.shutdown()

    mod._uniffi_continuation_callback = counting
    try:
        asyncio.run(workload(native=True))
        assert calls == []
        asyncio.run(workload(native=False))
        assert any(t != threading.get_ident() for t in calls)  # Tokio threads did
    finally:
        mod._uniffi_continuation_callback = original


def test_stop_if_no_generated_calls_waits_for_generated_calls_in_flight():
    mod = bindings()
    stopped = []

    async def main():
        fakes = FakeFutures(mod)
        task = asyncio.ensure_future(call(mod, fakes, 6))  # not installed: generated
        await wait_for(lambda: 6 in fakes.stored)
        assert not wake.stop_if_no_generated_calls(lambda: stopped.append(1))
        assert fakes.complete(6)
        assert await task == 60
        assert wake.stop_if_no_generated_calls(lambda: stopped.append(1))
        assert stopped == [1]

    run(main())


def test_many_loops_one_after_another_each_get_a_queue_as_old_ones_are_collected():
    """More loops than queue slots over a test process's life: a closed loop's queue is
    detached when the loop is collected (install collects once if all are taken)."""
    mod = bindings()

    async def one(h):
        assert wake.install()
        fakes = FakeFutures(mod, sync=True)
        return await call(mod, fakes, h)

    for h in range(_wake.MAX_QUEUES + 50):
        assert asyncio.run(one(h)) == h * 10


def test_calls_answered_during_their_poll_still_let_other_tasks_run():
    """A WAKE answered during the poll yields before the re-poll (as the generated path
    does: a self-waking future must not spin the loop), and a long run of ready-at-once
    calls yields every SYNC_STREAK calls."""
    mod = bindings()

    async def main():
        assert wake.install()
        turns = 0
        done = False

        async def other():
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        bystander = asyncio.ensure_future(other())
        await asyncio.sleep(0)
        start = turns
        assert await call(mod, FakeFutures(mod, sync=True, wakes_first=5), 1) == 10
        assert turns - start >= 5
        start = turns
        ready = FakeFutures(mod, sync=True)
        for h in range(10 * wake.SYNC_STREAK):
            assert await call(mod, ready, h) == h * 10
        assert turns - start >= 9
        done = True
        await bystander

    run(main())
