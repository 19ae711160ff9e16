"""bench/fill.py's pure parts: the status mix and the jobs it makes."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "fill.py"
_spec = importlib.util.spec_from_file_location("bench_fill", _PATH)
assert _spec is not None and _spec.loader is not None
fill = importlib.util.module_from_spec(_spec)
sys.modules["bench_fill"] = fill
_spec.loader.exec_module(fill)


def test_mix_is_exact_per_block_and_spread():
    mix = fill.parse_mix(fill.DEFAULT_MIX)
    got = Counter(fill.status_of(i, mix) for i in range(3000))
    assert got == {"Succeeded": 2550, "Failed": 150, "Cancelled": 90, "Waiting": 150,
                   "Scheduled": 60}
    failed = [i for i in range(1000) if fill.status_of(i, mix) == "Failed"]
    assert max(failed) - min(failed) > 500  # spread over the block, not one run


@pytest.mark.parametrize("bad", ["1,2,3", "1,2,3,4,-1", "0,0,0,0,0", "a,b,c,d,e"])
def test_bad_mix_is_refused(bad):
    with pytest.raises(ValueError):
        fill.parse_mix(bad)


def test_jobs_carry_the_metadata_the_benches_query():
    mix = fill.parse_mix(fill.DEFAULT_MIX)
    jobs = [fill.make_job(i, 5000, 10**13, mix, 4, False, "bench") for i in range(5000)]
    shared = Counter(j.metadata["customer"] for j, _ in jobs)
    assert set(shared.values()) == {1000}
    assert len({j.metadata["user"] for j, _ in jobs}) == 5000
    assert {j.task_group for j, _ in jobs} == {"g0", "g1", "g2", "g3"}
    job, status = fill.make_job(7, 10, 10**13, mix, 4, True, "deep")
    assert status == "Waiting" and job.task_group == "deep" and not job.attempts
