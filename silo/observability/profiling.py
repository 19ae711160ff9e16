"""What one worker process contributes to CpuProfile, HeapProfile and DumpTasks.

* CPU: the worker starts `py-spy record --nonblocking` on its own pid as a subprocess
  (never pausing the interpreter, so the worker keeps serving) and returns the parsed
  samples. Under Yama `ptrace_scope` 1 only an ancestor may ptrace a process; every
  worker therefore declares the supervisor as its tracer at start
  (`prctl(PR_SET_PTRACER, supervisor)`), which admits the supervisor's descendants — the
  py-spy that a worker starts is one of them.
* Heap: tracemalloc over the window; the allocations still alive at its end, by stack.
  On CPython 3.11 stopping tracemalloc can crash the process while a native thread
  enters Python (silo.storage.wake), so it is refused (FAILED_PRECONDITION) unless this
  loop's SlateDB completions are native, and the stop waits until no SlateDB call
  awaits the generated path. Nothing else enters Python from SlateDB's threads in a
  worker: its metrics recorder is called during `build()`'s poll on the loop thread
  (which has a thread state), and Silo registers no SlateDB log callback.
* Tasks: every asyncio task's coroutine stack and every thread's Python stack.

One CPU or heap profile runs at a time per process; a second caller waits its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import linecache
import os
import shutil
import sys
import tempfile
import threading
import traceback
import tracemalloc
from pathlib import Path

import grpc

from silo.errors import SiloError
from silo.storage import wake

PR_SET_PTRACER = 0x59616D61  # "Yama"
HEAP_FRAMES = 32

_one_at_a_time = asyncio.Lock()


class ProfilerMissing(Exception):
    """py-spy is not installed next to this Python nor on PATH."""


def allow_ptrace_from_parent() -> None:
    """Let the supervisor and its descendants (py-spy started by any worker) ptrace this
    worker under Yama ptrace_scope 1, where only ancestors may otherwise attach."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, os.getppid(), 0, 0, 0)


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def clamp(value: int, default: int, lo: int, hi: int) -> int:
    """behaviour.md §1.2: 0 means the default, anything else is clamped to [lo, hi]."""
    return default if value == 0 else max(lo, min(hi, value))


def parse_raw(text: str) -> list[tuple[list[tuple[str, str, int]], int]]:
    """py-spy's `--format raw` (collapsed stacks: `f (file:line);g (file:line) N`)."""
    out = []
    for line in text.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        frames = []
        for part in stack_text.split(";"):
            name, _, where = part.rpartition(" (")
            filename, _, lineno = where.rstrip(")").rpartition(":")
            if not name:  # no location: py-spy prints the bare name
                name, filename, lineno = part, "", "0"
            frames.append((name, filename, int(lineno) if lineno.isdigit() else 0))
        out.append((frames, int(count)))
    return out


async def cpu_samples(duration_s: int, rate: int) -> list[tuple[list, int]]:
    """Sample this process with py-spy for duration_s at rate Hz; (stack, count) pairs."""
    exe = py_spy_path()
    if exe is None:
        raise ProfilerMissing("py-spy not found next to the server's python or on PATH "
                              "(install it with: pip install py-spy)")
    async with _one_at_a_time:
        with tempfile.TemporaryDirectory(prefix="silo-prof-") as tmp:
            out = os.path.join(tmp, "raw.txt")
            proc = await asyncio.create_subprocess_exec(
                exe, "record", "--pid", str(os.getpid()), "--duration", str(duration_s),
                "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", out,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"py-spy failed (exit {proc.returncode}): "
                                   f"{err.decode(errors='replace').strip()[-400:]}")
            with open(out) as f:
                return parse_raw(f.read())


async def heap_samples(duration_s: int) -> list[tuple[list, int, int]]:
    """Allocations made during the window and still alive at its end:
    (stack root-first, objects, bytes).

    Refused (HeapProfileUnsafe, FAILED_PRECONDITION) where stopping tracemalloc could
    crash the process; see heap_profile_refusal."""
    refusal = heap_profile_refusal()
    if refusal:
        raise HeapProfileUnsafe(refusal)
    async with _one_at_a_time:
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start(HEAP_FRAMES)
        try:
            await asyncio.sleep(duration_s)
            snapshot = tracemalloc.take_snapshot()
        finally:
            if not was_tracing:
                await _stop_tracing_safely()
    snapshot = snapshot.filter_traces((tracemalloc.Filter(False, tracemalloc.__file__),))
    out = []
    for stat in snapshot.statistics("traceback"):
        frames = [(_frame_name(fr.filename, fr.lineno), fr.filename, fr.lineno)
                  for fr in stat.traceback]  # oldest first, like py-spy's root-first
        out.append((frames, stat.count, stat.size))
    return out


class HeapProfileUnsafe(SiloError):
    """A heap profile here could crash the process (FAILED_PRECONDITION)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)


# CPython before 3.12: tracemalloc.stop() frees the traceback buffer that a thread
# waiting for the GIL inside tracemalloc's raw-malloc hook is about to write to
# (silo.storage.wake explains the crash; tests/unit/test_wake_crash.py reproduces it).
TRACEMALLOC_STOP_RACES = sys.version_info < (3, 12)
QUIESCE_POLL_S = 0.01


def heap_profile_refusal() -> str | None:
    """Why a heap profile is refused in this process, or None if it is safe.

    On CPython 3.11 a native thread entering Python while tracemalloc stops can crash
    the process, and every SlateDB completion is one unless silo.storage._wake delivers
    it natively: a refused profile is better than a dead worker."""
    if not TRACEMALLOC_STOP_RACES:
        return None
    if not wake.available():
        return ("HeapProfile is refused: this server runs CPython "
                f"{sys.version_info.major}.{sys.version_info.minor} without the native "
                "wake module silo.storage._wake (built by pip install when gcc and the "
                "Python headers are present), and stopping tracemalloc while SlateDB's "
                "threads enter Python can crash the process (fixed in CPython 3.12)")
    if not wake.installed():
        return ("HeapProfile is refused: SlateDB completions on this event loop are not "
                "delivered natively (silo.storage.wake.install was not called), and "
                "stopping tracemalloc while SlateDB's threads enter Python can crash the "
                "process on CPython < 3.12")
    return None


async def _stop_tracing_safely() -> None:
    """tracemalloc.stop() once no SlateDB call is waiting on the generated (Python
    thread-entering) completion path, with none able to start meanwhile
    (silo.storage.wake.stop_if_no_generated_calls). Only other loops or threads of this
    process make such calls (none in a worker), so this normally stops at once."""
    if not TRACEMALLOC_STOP_RACES:
        tracemalloc.stop()
        return
    while not wake.stop_if_no_generated_calls(tracemalloc.stop):
        await asyncio.sleep(QUIESCE_POLL_S)


def _frame_name(filename: str, lineno: int) -> str:
    """tracemalloc frames carry no function name: name them by file, line and source."""
    src = linecache.getline(filename, lineno).strip()
    return f"{os.path.basename(filename)}:{lineno} {src[:60]}".rstrip()


def dump_tasks(label: str) -> tuple[str, int]:
    """Text of every asyncio task's stack and every thread's stack; (text, task count)."""
    buf = io.StringIO()
    try:
        tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    except RuntimeError:
        tasks = []
    buf.write(f"=== {label} (pid {os.getpid()}): {len(tasks)} asyncio tasks ===\n")
    for t in tasks:
        buf.write(f"--- task {t.get_name()!r} {t.get_coro()!r}\n")
        frames = t.get_stack()
        if frames:
            for line in traceback.format_list(
                    [(f.f_code.co_filename, f.f_lineno, f.f_code.co_name, None) for f in frames]):
                buf.write(line)
        else:
            buf.write("  (no Python frames: not started or waiting in C)\n")
    names = {th.ident: th.name for th in threading.enumerate()}
    frames_by_thread = sys._current_frames()
    buf.write(f"=== {label}: {len(frames_by_thread)} threads ===\n")
    for ident, frame in frames_by_thread.items():
        buf.write(f"--- thread {names.get(ident, '?')!r} ({ident})\n")
        buf.write("".join(traceback.format_stack(frame)))
    return buf.getvalue(), len(tasks)
