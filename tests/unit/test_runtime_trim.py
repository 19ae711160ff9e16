"""The worker's periodic malloc_trim (silo.runtime.trim): when, and only when, it grew."""

from __future__ import annotations

import asyncio

from silo.runtime.trim import (
    ARENA_MAX,
    M_ARENA_MAX,
    limit_arenas,
    resident_bytes,
    should_trim,
    trim_forever,
)

MiB = 1 << 20


def test_should_trim_after_growth_only():
    assert should_trim(100 * MiB, 80 * MiB, 16 * MiB)
    assert not should_trim(90 * MiB, 80 * MiB, 16 * MiB)
    assert not should_trim(50 * MiB, 80 * MiB, 16 * MiB)


def test_resident_bytes_reads_this_process():
    assert resident_bytes() > 1 * MiB


def test_trims_when_resident_size_grew_and_rebases_after():
    sizes = iter([100, 100, 140, 110, 112, 200, 200] + [200] * 50)
    calls: list[int] = []

    async def run() -> None:
        task = asyncio.ensure_future(trim_forever(
            trim=lambda pad: calls.append(pad) or 1, rss=lambda: next(sizes) * MiB,
            interval_s=0.001, min_growth=16 * MiB))
        for _ in range(1000):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(run())
    # 100 -> 100: no; 140 (+40): trim, base 110; 112: no; 200 (+90): trim.
    assert calls == [0, 0]


def test_without_malloc_trim_it_returns_at_once():
    asyncio.run(asyncio.wait_for(trim_forever(trim=None), 1.0))


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_limit_arenas_unless_the_operator_chose():
    libc = _Libc()
    assert limit_arenas({}, libc)
    assert libc.calls == [(M_ARENA_MAX, ARENA_MAX)]
    chosen = _Libc()
    assert not limit_arenas({"MALLOC_ARENA_MAX": "8"}, chosen)
    assert chosen.calls == []
    assert not limit_arenas({}, object())  # no mallopt (not glibc)
