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
