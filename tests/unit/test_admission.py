"""The back-pressure policy (silo.rpc.admission.Admission), without I/O."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from silo.errors import SiloError
from silo.rpc.admission import Admission


def test_admits_up_to_the_bound_then_refuses():
    a = Admission(100)
    assert a.try_acquire(60) and a.try_acquire(40)
    assert not a.try_acquire(1)
    a.release(40)
    assert a.try_acquire(30) and a.inflight == 90 and a.peak == 100 and a.rejected == 1


def test_one_call_bigger_than_the_bound_runs_alone():
    a = Admission(100)
    assert a.try_acquire(500)
    assert not a.try_acquire(1)
    a.release(500)
    assert a.inflight == 0 and a.try_acquire(1)


def test_check_refuses_with_resource_exhausted_and_writes_while_stalled():
    a = Admission(10)
    a.check("Enqueue", 10)
    with pytest.raises(SiloError) as e:
        a.check("Enqueue", 1)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_bytes" in e.value.message
    a.release(10)
    a.storage_stalled = True
    with pytest.raises(SiloError) as e:
        a.check("ReportOutcome", 1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    a.check("GetJob", 1)  # reads are still served


@given(st.integers(1, 1000), st.lists(st.tuples(st.booleans(), st.integers(0, 400)),
                                      max_size=60))
def test_inflight_never_exceeds_bound_unless_alone(bound, steps):
    a = Admission(bound)
    held: list[int] = []
    for acquire, n in steps:
        if acquire:
            if a.try_acquire(n):
                held.append(n)
        elif held:
            a.release(held.pop())
        assert a.inflight == sum(held)
        assert a.inflight <= bound or len([h for h in held if h]) == 1
