"""Micro-benchmarks of the hot path's pure-Python pieces: key encoding and record codecs.

Run them all with ``bench/micro.sh`` (or ``python -m pytest bench/micro -m microbench
-p no:cacheprovider -q``); they are excluded from the default test run.

What one call does, as the shard does it per job:

* ``keys.task``: the ready-queue key of a task (enqueue, retry); ``keys.job_info``: the
  job info / status key (enqueue, lease, outcome); ``keys.decode_task``: a task key back
  to its tuple (index rebuild at open).
* ``JobInfo`` encode/decode with a 100 B payload: written at enqueue, read at lease when
  the job-info cache misses. ``Lease`` encode/decode: written at lease, decoded at open.

Each figure is one call; pytest-benchmark's mean is the time per operation. The encoded
size is in ``extra_info['bytes']``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    import silo  # noqa: F401
except ImportError:  # plain `pytest` from elsewhere: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from silo.ids import new_id  # noqa: E402
from silo.storage import keys  # noqa: E402
from silo.storage.records import (  # noqa: E402
    JobInfo,
    Lease,
    RunAttempt,
    encode,
    job_info_decoder,
    lease_decoder,
)

pytestmark = pytest.mark.microbench

T0 = 1_700_000_000_000
TENANT = "-"
GROUP = "bench"
PRIORITY = 50
JOB_ID = new_id()
TASK_ID = new_id()
PAYLOAD = os.urandom(100)


def job_info() -> JobInfo:
    return JobInfo(JOB_ID, TENANT, PRIORITY, T0, PAYLOAD, None, {}, [], GROUP)


def lease() -> Lease:
    task = RunAttempt(TASK_ID, TENANT, JOB_ID, 1, 1, GROUP)
    return Lease(f"worker-{JOB_ID[:8]}", task, T0 + 10_000, T0, PRIORITY)


# ---- keys -------------------------------------------------------------------


def test_key_task(benchmark):
    key = benchmark(keys.task, GROUP, T0, PRIORITY, JOB_ID, 1, TENANT)
    assert key[0] == keys.TASK
    benchmark.extra_info["bytes"] = len(key)


def test_key_job_info(benchmark):
    key = benchmark(keys.job_info, TENANT, JOB_ID)
    assert key[0] == keys.JOB_INFO
    benchmark.extra_info["bytes"] = len(key)


def test_key_decode_task(benchmark):
    key = keys.task(GROUP, T0, PRIORITY, JOB_ID, 1, TENANT)
    got = benchmark(keys.decode_task, key)
    assert got == (GROUP, T0, PRIORITY, JOB_ID, 1, TENANT)
    benchmark.extra_info["bytes"] = len(key)


# ---- records ----------------------------------------------------------------


def test_jobinfo_encode_100b(benchmark):
    info = job_info()
    raw = benchmark(encode, info)
    assert job_info_decoder.decode(raw) == info
    benchmark.extra_info["bytes"] = len(raw)


def test_jobinfo_decode_100b(benchmark):
    info = job_info()
    raw = encode(info)
    got = benchmark(job_info_decoder.decode, raw)
    assert got == info
    benchmark.extra_info["bytes"] = len(raw)


def test_lease_encode(benchmark):
    ls = lease()
    raw = benchmark(encode, ls)
    assert lease_decoder.decode(raw) == ls
    benchmark.extra_info["bytes"] = len(raw)


def test_lease_decode(benchmark):
    ls = lease()
    raw = encode(ls)
    got = benchmark(lease_decoder.decode, raw)
    assert got == ls
    benchmark.extra_info["bytes"] = len(raw)
