"""bench/stream_cost.py drives EnqueueMany and a worker stream through the server's own
code until every job's outcome is acked, and reports a cost per job (a smoke test: the
figures themselves are for the bench)."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from pathlib import Path

import uvloop

_PATH = Path(__file__).resolve().parents[2] / "bench" / "stream_cost.py"
_spec = importlib.util.spec_from_file_location("bench_stream_cost", _PATH)
assert _spec is not None and _spec.loader is not None
stream_cost = importlib.util.module_from_spec(_spec)
sys.modules["bench_stream_cost"] = stream_cost
_spec.loader.exec_module(stream_cost)


def test_every_job_runs_to_its_ack_and_gc_is_left_as_it_was():
    threshold = gc.get_threshold()
    args = argparse.Namespace(jobs=300, warmup=100, shards=2, batch=32, enqueuers=2,
                              slots=64, backlog=200, store="memory")
    rep = uvloop.run(stream_cost.run(args))
    assert rep["jobs"] == 300 and rep["cpu_us_per_job"] > 0
    assert rep["commits_per_job"] > 0 and rep["down_msgs_per_job"] > 0
    assert rep["up_msgs_per_job"] > 0
    assert gc.get_threshold() == threshold


def test_key_tally_counts_every_kind_a_job_writes():
    args = argparse.Namespace(jobs=200, warmup=50, shards=1, batch=32, enqueuers=1,
                              slots=64, backlog=200, store="memory", keys=True)
    rep = uvloop.run(stream_cost.run(args))
    table = rep["keys"]
    for kind in ("0x01 job info", "0x02 job status", "0x03 status index", "0x05 task",
                 "0x07 attempt"):
        assert f"| {kind} | put |" in table
    total = float(table.strip().splitlines()[-1].split("|")[3])
    assert 8 < total < 30  # keys per job, whatever the layout of the day
