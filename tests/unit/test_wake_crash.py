"""The CPython 3.11 tracemalloc crash behind HeapProfile's refusal and silo.storage.wake.

A thread with no Python thread state that enters Python (a ctypes callback, as the
bindings' continuation is on SlateDB's Tokio threads) allocates its thread state with
PyMem_RawMalloc; with tracemalloc on, its hook waits for the GIL, and a tracemalloc.stop()
by the GIL holder meanwhile makes the hook write through a NULL traceback
(`traceback_new`, "segfault at 8"). The first test shows it deterministically; the rest
check that Silo never gets there.

The stress variant (SlateDB writes completing on Tokio threads while the loop starts
and stops tracemalloc) is slow: `pytest -m slow tests/unit/test_wake_crash.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import grpc
import pytest

from silo.observability import profiling
from silo.storage import wake

RACE = textwrap.dedent("""
    import ctypes, sys, time, tracemalloc
    sys.setswitchinterval(100.0)        # the main thread keeps the GIL until it blocks
    libc = ctypes.PyDLL(None)           # PyDLL: pthread_create does not release the GIL
    body = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda arg: None)
    tracemalloc.start(1)
    tid = ctypes.c_ulong()
    assert libc.pthread_create(ctypes.byref(tid), None, body, None) == 0
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:    # the new thread blocks in the hook, on the GIL
        pass
    tracemalloc.stop()
    time.sleep(0.5)                     # let it run
    ctypes.CDLL(None).pthread_join(tid, None)
""")

STRESS = textwrap.dedent("""
    import asyncio, sys, tempfile, time, tracemalloc
    from silo.storage import wake
    from silo.storage.database import open_database

    async def main(seconds, native):
        if native:
            assert wake.install()
        d = await open_database("file://" + tempfile.mkdtemp(), "s",
                                flush_interval_ms=10, l0_sst_size_bytes=1 << 20)
        stop = time.monotonic() + seconds

        async def writer(n):
            i = 0
            while time.monotonic() < stop:
                await d.put(b"k%d-%d" % (n, i % 500), b"v" * 100)
                i += 1

        async def profiler():
            while time.monotonic() < stop:
                tracemalloc.start(4)
                await asyncio.sleep(0.002)
                tracemalloc.stop()
                await asyncio.sleep(0)

        await asyncio.gather(profiler(), *(writer(n) for n in range(8)))
        await d.shutdown()

    asyncio.run(main(float(sys.argv[1]), sys.argv[2] == "native"))
""")


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", script, *args], env=env,
                          capture_output=True, timeout=timeout)


@pytest.mark.skipif(not profiling.TRACEMALLOC_STOP_RACES, reason="fixed in CPython 3.12")
def test_a_native_thread_entering_python_while_tracemalloc_stops_crashes_this_python():
    out = _run(RACE, timeout=60)
    assert out.returncode == -signal.SIGSEGV, out.stderr.decode()[-2000:]


@pytest.mark.skipif(not profiling.TRACEMALLOC_STOP_RACES, reason="fixed in CPython 3.12")
def test_heap_profile_is_refused_without_the_native_wake(monkeypatch):
    monkeypatch.setattr(wake, "available", lambda: False)
    reason = profiling.heap_profile_refusal()
    assert reason and "silo.storage._wake" in reason and "refused" in reason
    with pytest.raises(profiling.HeapProfileUnsafe) as e:
        asyncio.run(profiling.heap_samples(1))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not tracemalloc.is_tracing()


@pytest.mark.skipif(not profiling.TRACEMALLOC_STOP_RACES, reason="fixed in CPython 3.12")
def test_heap_profile_is_refused_on_a_loop_without_the_wake_installed():
    async def main():
        assert not wake.installed()
        with pytest.raises(profiling.HeapProfileUnsafe, match="not .*delivered natively"):
            await profiling.heap_samples(1)

    asyncio.run(main())


def test_heap_profile_runs_on_a_loop_with_the_wake_installed():
    async def main():
        assert wake.install()
        assert profiling.heap_profile_refusal() is None
        keep = [bytearray(1000) for _ in range(100)]  # noqa: F841 - alive at the end
        samples = await profiling.heap_samples(1)
        assert samples and not tracemalloc.is_tracing()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["native", "generated"])
def test_stress_slatedb_writes_while_tracemalloc_starts_and_stops(mode):
    """native: survives 30 s. generated (the bindings' own path): crashed within ~1-3 s
    in 10 of 10 runs on this project's box; documented here, not required to crash."""
    out = _run(STRESS, "30", mode, timeout=180)
    if mode == "native":
        assert out.returncode == 0, out.stderr.decode()[-2000:]
    else:
        assert out.returncode in (0, -signal.SIGSEGV), out.stderr.decode()[-2000:]
