"""Give memory that storage freed back to the OS, in a worker process.

SlateDB (which allocates with the process's glibc malloc) frees memory in bursts no RPC
shows: a memtable written to an L0 SST, the buffers of a compaction that merged a
fill's L0 SSTs into sorted runs. glibc keeps those pages mapped until `malloc_trim`;
`silo.rpc.memtrim` trims only after a burst of big requests, which a fill of many small
jobs never is. So a worker looks every `INTERVAL_S` and trims when, since its last
trim, its resident size grew by `MIN_CHANGE_BYTES` or the heap in use (mallinfo2)
shrank by as much: the second catches memory freed after a trim that ran while it was
still in use (a compaction in progress), which the resident size alone never shows
(a few ms on a few hundred MB of heap, in a thread: ctypes releases the GIL).

Two malloc settings, made before the worker's native threads start (`tune_malloc`;
each skipped when its glibc environment variable is set):

* arenas capped at `ARENA_MAX` (MALLOC_ARENA_MAX): by default each of SlateDB's threads
  may get its own arena (up to 8 per core), each holding freed memory of its own; one
  shard at 300k queued in one process was +124 MB of RSS over 1,000 queued with the
  default, +100 MB with 2 (loaded, run side by side). A worker is pinned to one core,
  so its threads hardly contend for an arena;
* a fixed mmap threshold, `MMAP_THRESHOLD` (MALLOC_MMAP_THRESHOLD_): glibc's default
  starts at 128 KiB and rises to the size of every large block freed (up to 32 MiB), so
  after SlateDB's first freed SST buffer all its multi-MB buffers (SSTs being built,
  compaction read-ahead, filter hashes) come from the heap and leave it fragmented;
  fixed, they are mapped and unmapped whole. One shard filled to 300k jobs in one
  process (bench/README.md "Deep queue"): heap 92 MB instead of 134, RSS between trims
  163-164 MB instead of 175-205, the same CPU (94.0 s vs 95.2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

from silo.rpc.memtrim import _malloc_trim

log = logging.getLogger(__name__)

ARENA_MAX = 2
M_ARENA_MAX = -8  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 10
INTERVAL_S = 5.0
MIN_CHANGE_BYTES = 8 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    return ctypes.CDLL("libc.so.6")


def tune_malloc(environ: Mapping[str, str] = os.environ, libc=None) -> dict[str, bool]:
    """Cap malloc arenas and fix the mmap threshold in this process (before its native
    threads start); says which of the two were set (not where the operator's glibc
    environment variable decides, or where the C library has no mallopt)."""
    done = {"arenas": False, "mmap_threshold": False}
    try:
        lib = _libc() if libc is None else libc
        if "MALLOC_ARENA_MAX" not in environ:
            done["arenas"] = bool(lib.mallopt(M_ARENA_MAX, ARENA_MAX))
        if "MALLOC_MMAP_THRESHOLD_" not in environ:
            done["mmap_threshold"] = bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        pass
    return done


def limit_arenas(environ: Mapping[str, str] = os.environ, libc=None) -> bool:
    """The worker's entry point (silo.runtime.worker): every setting of `tune_malloc`;
    True when the arenas were capped."""
    return tune_malloc(environ, libc)["arenas"]


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = _libc().mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.argtypes = []
    fn.restype = _MallInfo2
    return fn


_mallinfo2 = _load_mallinfo2()


def heap_in_use() -> int:
    """Bytes allocated from malloc's arenas (not counting mapped blocks, which free()
    unmaps at once); 0 where mallinfo2 is missing."""
    if _mallinfo2 is None:
        return 0
    return int(_mallinfo2().uordblks)


class Sample(NamedTuple):
    rss: int  # resident bytes
    in_use: int  # heap bytes allocated


def should_trim(now: Sample, last: Sample, min_change: int = MIN_CHANGE_BYTES) -> bool:
    """Trim when, since `last` (the sample after the previous trim), the resident size
    grew by min_change, or the heap freed that much (its pages are still resident)."""
    return now.rss - last.rss >= min_change or last.in_use - now.in_use >= min_change


async def trim_forever(trim: Callable[[int], int] | None = _malloc_trim,
                       rss: Callable[[], int] = resident_bytes,
                       interval_s: float = INTERVAL_S,
                       min_change: int = MIN_CHANGE_BYTES,
                       in_use: Callable[[], int] = heap_in_use) -> None:
    """Run until cancelled (does nothing without malloc_trim, e.g. on musl or macOS)."""
    if trim is None:
        return
    loop = asyncio.get_running_loop()
    last = Sample(rss(), in_use())
    while True:
        await asyncio.sleep(interval_s)
        now = Sample(rss(), in_use())
        if not should_trim(now, last, min_change):
            # Growth counts from the lowest resident size seen since the last trim.
            last = Sample(min(last.rss, now.rss), last.in_use)
            continue
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, trim, 0)
        last = Sample(rss(), in_use())
