"""Give freed memory back to the OS after a flood of big requests.

glibc keeps the heap and arena pages a burst of multi-MiB payloads used: after a 64 × 10 MiB
flood the worker that owns the shard stayed ~1.6 GiB resident for good, although nothing
held those bytes any more. `malloc_trim(0)` returns the free pages. It is run when the
process's in-flight request bytes drop back to zero after having been high, at most once
per second, in a thread (ctypes releases the GIL), so no call ever waits on it. Follow-up
trims 5, 15 and 30 s later return what storage freed after the calls ended (write
batches, memtables flushed to SSTs). On a libc without `malloc_trim` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MiB = 1 << 20
# Bursts smaller than this leave little behind; not worth a trim.
THRESHOLD_BYTES = 64 * MiB
MIN_INTERVAL_S = 1.0
FOLLOW_UPS_S = (5.0, 10.0, 15.0)  # gaps between the follow-up trims


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_trim()


def trim_threshold(max_inflight_bytes: int) -> int:
    """A burst counts as big from 64 MiB, or half the bound when the bound is smaller."""
    return max(1, min(THRESHOLD_BYTES, max_inflight_bytes // 2))


def trim_delay(now: float, last_trim: float, min_interval: float = MIN_INTERVAL_S) -> float:
    """Seconds to wait before the next trim so trims are at least min_interval apart."""
    return max(0.0, last_trim + min_interval - now)


class Trimmer:
    """Schedules malloc_trim when an Admission reports a big burst has drained."""

    def __init__(self, threshold: int, trim: Callable[[int], int] | None = _malloc_trim,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self._trim = trim
        self._clock = clock
        self._last = -MIN_INTERVAL_S
        self._scheduled = False
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def drained(self, high: int) -> None:
        """In-flight bytes are back to zero after peaking at `high` since the last drain."""
        if self._trim is None or high < self.threshold or self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled = True
        loop.call_later(trim_delay(self._clock(), self._last), self._start, loop, 0)

    def _start(self, loop: asyncio.AbstractEventLoop, step: int) -> None:
        self._last = self._clock()
        fut = loop.run_in_executor(None, self._run)
        if step < len(FOLLOW_UPS_S):
            fut.add_done_callback(
                lambda _f: loop.call_later(FOLLOW_UPS_S[step], self._start, loop, step + 1))
        else:
            fut.add_done_callback(lambda _f: setattr(self, "_scheduled", False))

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            self._trim(0)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a failed trim only means memory is kept
            log.debug("malloc_trim failed", exc_info=True)
            return
        self.trims += 1
        log.debug("malloc_trim(0) took %.1f ms", (time.monotonic() - t0) * 1000)
