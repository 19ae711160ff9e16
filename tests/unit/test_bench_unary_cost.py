"""bench/unary_cost.py serves real Enqueue and GetJob calls through the handler chain and
reports a cost for each (a smoke test: the figures themselves are for the bench)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "unary_cost.py"
_spec = importlib.util.spec_from_file_location("bench_unary_cost", _PATH)
assert _spec is not None and _spec.loader is not None
unary_cost = importlib.util.module_from_spec(_spec)
sys.modules["bench_unary_cost"] = unary_cost
_spec.loader.exec_module(unary_cost)


def test_both_methods_are_served_and_measured_and_gc_is_left_as_it_was():
    threshold = gc.get_threshold()
    args = argparse.Namespace(calls=64, concurrency=16, method="Enqueue,GetJob",
                              store="memory")
    rep = asyncio.run(unary_cost.run(args))
    assert set(rep) == {"Enqueue", "GetJob"}
    for r in rep.values():
        assert r["calls"] == 64 and r["cpu_us_per_call"] > 0
        assert len(r["gc_collections_per_1000_calls"]) == 3
    assert gc.get_threshold() == threshold


def test_whole_jobs_directly_and_as_forwarded_calls():
    """Job: every enqueued job is leased and reported in its round (else the round would
    never end or ReportOutcome would fail); --forwarded serves them through dispatch."""
    for forwarded in (False, True):
        args = argparse.Namespace(calls=32, concurrency=16, method="Job", store="memory",
                                  forwarded=forwarded)
        rep = asyncio.run(unary_cost.run(args))
        assert rep["Job"]["calls"] == 32 and rep["Job"]["cpu_us_per_call"] > 0
