"""The worker's periodic malloc_trim (silo.runtime.trim): when the resident size grew or
the heap freed memory since the last trim, and only then; and its malloc settings."""

from __future__ import annotations

import asyncio

from silo.runtime.trim import (
    ARENA_MAX,
    M_ARENA_MAX,
    M_MMAP_THRESHOLD,
    MMAP_THRESHOLD,
    Sample,
    heap_in_use,
    limit_arenas,
    resident_bytes,
    should_trim,
    trim_forever,
    tune_malloc,
)

MiB = 1 << 20


def test_should_trim_after_growth_only():
    last = Sample(80 * MiB, 40 * MiB)
    assert should_trim(Sample(100 * MiB, 40 * MiB), last, 16 * MiB)
    assert not should_trim(Sample(90 * MiB, 40 * MiB), last, 16 * MiB)
    assert not should_trim(Sample(50 * MiB, 40 * MiB), last, 16 * MiB)


def test_should_trim_when_the_heap_freed_memory_the_resident_size_does_not_show():
    """A trim while a compaction ran kept its buffers; once they are freed the resident
    size is unchanged, but the heap in use fell: trim then."""
    last = Sample(200 * MiB, 120 * MiB)
    assert should_trim(Sample(200 * MiB, 70 * MiB), last, 16 * MiB)
    assert not should_trim(Sample(200 * MiB, 110 * MiB), last, 16 * MiB)
    assert not should_trim(Sample(200 * MiB, 150 * MiB), last, 16 * MiB)


def test_heap_in_use_reads_this_process():
    assert heap_in_use() > 0  # glibc (the CI and server images)


def test_resident_bytes_reads_this_process():
    assert resident_bytes() > 1 * MiB


def test_trims_when_resident_size_grew_and_rebases_after():
    sizes = iter([100, 100, 140, 110, 112, 200, 200] + [200] * 50)
    calls: list[int] = []

    async def run() -> None:
        task = asyncio.ensure_future(trim_forever(
            trim=lambda pad: calls.append(pad) or 1, rss=lambda: next(sizes) * MiB,
            interval_s=0.001, min_change=16 * MiB, in_use=lambda: 10 * MiB))
        for _ in range(1000):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(run())
    # 100 -> 100: no; 140 (+40): trim, base 110; 112: no; 200 (+90): trim.
    assert calls == [0, 0]


def test_trims_when_the_heap_in_use_fell_at_the_same_resident_size():
    # first value: the sample at start; then one per tick
    heap = iter([150, 150, 160, 140, 100] + [100] * 50)
    calls: list[int] = []

    async def run() -> None:
        task = asyncio.ensure_future(trim_forever(
            trim=lambda pad: calls.append(pad) or 1, rss=lambda: 300 * MiB,
            interval_s=0.001, min_change=16 * MiB, in_use=lambda: next(heap) * MiB))
        for _ in range(1000):
            if calls:
                break
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(run())
    # 150, 160, 140 (-10): no; 100 (-50 from the 150 at start): trim.
    assert calls == [0]


def test_without_malloc_trim_it_returns_at_once():
    asyncio.run(asyncio.wait_for(trim_forever(trim=None), 1.0))


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_malloc_settings_unless_the_operator_chose():
    libc = _Libc()
    assert limit_arenas({}, libc)
    assert libc.calls == [(M_ARENA_MAX, ARENA_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD)]
    chosen = _Libc()
    assert not limit_arenas({"MALLOC_ARENA_MAX": "8"}, chosen)
    assert chosen.calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD)]
    both = _Libc()
    assert tune_malloc({"MALLOC_ARENA_MAX": "8", "MALLOC_MMAP_THRESHOLD_": "65536"}, both) == {
        "arenas": False, "mmap_threshold": False}
    assert both.calls == []
    assert not limit_arenas({}, object())  # no mallopt (not glibc)
