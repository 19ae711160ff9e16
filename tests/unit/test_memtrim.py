"""The memory-trim policy: trim only after a big burst drains, never twice within a second."""

from __future__ import annotations

import asyncio

from silo.rpc.admission import Admission
from silo.rpc.memtrim import MiB, Trimmer, trim_delay, trim_threshold


def test_threshold_is_64_mib_or_half_a_small_bound():
    assert trim_threshold(256 * MiB) == 64 * MiB
    assert trim_threshold(8 * MiB) == 4 * MiB


def test_trims_are_at_least_a_second_apart():
    assert trim_delay(now=10.0, last_trim=9.5) == 0.5
    assert trim_delay(now=10.0, last_trim=5.0) == 0.0


def test_admission_reports_the_burst_high_when_it_drains():
    seen = []
    a = Admission(100)
    a.on_drained = seen.append
    assert a.try_acquire(30) and a.try_acquire(50)
    a.release(30)
    assert seen == []
    a.release(50)
    assert seen == [80]
    assert a.try_acquire(10)
    a.release(10)
    assert seen == [80, 10]


def test_trim_runs_off_the_call_path_only_after_a_big_burst():
    calls = []

    async def main():
        t = Trimmer(threshold=50, trim=calls.append)
        t.drained(10)  # small burst: nothing
        await asyncio.sleep(0.05)
        assert calls == []
        t.drained(80)
        t.drained(90)  # already scheduled: one trim, not two
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls == [0]
        assert t.trims == 1

    asyncio.run(main())


def test_no_libc_trim_means_no_op():
    t = Trimmer(threshold=1, trim=None)
    assert not t.available
    t.drained(10)  # no loop, no trim function: must not raise
