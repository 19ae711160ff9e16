"""Give memory that storage freed back to the OS, now and then, in a worker process.

SlateDB frees memory in bursts no RPC shows: a memtable written to an L0 SST, the
buffers of a compaction that merged a fill's L0 SSTs into sorted runs. glibc keeps
those pages mapped until `malloc_trim`; `silo.rpc.memtrim` trims only after a burst of
big requests, which a fill of many small jobs never is. So a worker also trims every
`INTERVAL_S` when its resident size grew by `MIN_GROWTH_BYTES` since the last trim (a
few ms on a few hundred MB of heap, in a thread: ctypes releases the GIL).

And a worker caps glibc's malloc arenas at `ARENA_MAX` (unless MALLOC_ARENA_MAX is set):
by default each of SlateDB's threads may get its own arena (up to 8 per core), each
holding freed memory of its own; one shard at 300k queued in one process was
+124 MB of RSS over 1,000 queued with the default, +100 MB with 2 (loaded, run side by
side). A worker is pinned to one core, so its threads hardly contend for an arena.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping

from silo.rpc.memtrim import _malloc_trim

log = logging.getLogger(__name__)

ARENA_MAX = 2
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
INTERVAL_S = 15.0
MIN_GROWTH_BYTES = 16 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def limit_arenas(environ: Mapping[str, str] = os.environ, libc=None) -> bool:
    """Cap this process's malloc arenas (before its native threads start); False when
    MALLOC_ARENA_MAX decides or the C library has no mallopt."""
    if "MALLOC_ARENA_MAX" in environ:
        return False
    try:
        if libc is None:
            import ctypes  # noqa: PLC0415

            libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))
    except (OSError, AttributeError):
        return False


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def should_trim(rss: int, after_last_trim: int, min_growth: int = MIN_GROWTH_BYTES) -> bool:
    """Trim when the resident size grew by at least min_growth since the last trim."""
    return rss - after_last_trim >= min_growth


async def trim_forever(trim: Callable[[int], int] | None = _malloc_trim,
                       rss: Callable[[], int] = resident_bytes,
                       interval_s: float = INTERVAL_S,
                       min_growth: int = MIN_GROWTH_BYTES) -> None:
    """Run until cancelled (does nothing without malloc_trim, e.g. on musl or macOS)."""
    if trim is None:
        return
    loop = asyncio.get_running_loop()
    base = rss()
    while True:
        await asyncio.sleep(interval_s)
        now = rss()
        if not should_trim(now, base, min_growth):
            base = min(base, now)
            continue
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, trim, 0)
        base = rss()
