"""Micro-benchmarks of the slatedb FFI marshalling with ``silo.storage.ffi`` applied.

Run from the repository root (excluded from the default test run):

    python -m pytest bench/micro/test_ffi_bench.py -m microbench -q -p no:cacheprovider

The patches are process-wide and cannot be undone, so only the patched numbers are
measured here. For the unpatched baseline run the same operations in a fresh
interpreter without calling ``apply()``. ``test_get_300b_x100`` times 100 sequential
``await db.get`` calls per round (one event-loop entry per round); divide by 100, or
read ``extra_info['us_per_get']``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

try:
    import silo  # noqa: F401
except ImportError:  # plain `pytest` from elsewhere: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from silo.storage import ffi  # noqa: E402

ffi.apply()

from slatedb.uniffi import DbBuilder, ObjectStore, WriteBatch  # noqa: E402

pytestmark = pytest.mark.microbench

KEY = b"job/0000000000000001"
GETS_PER_ROUND = 100


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def db(loop, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ffi-bench") / "db").lstrip("/")
    db = loop.run_until_complete(DbBuilder(path, ObjectStore.resolve("file:///")).build())

    async def seed():
        wb = WriteBatch()
        wb.put(KEY, os.urandom(300))
        h = await db.write(wb)
        await h.await_durable()

    loop.run_until_complete(seed())
    yield db
    loop.run_until_complete(db.shutdown())


@pytest.mark.parametrize("size", [300, 3000], ids=["300B", "3kB"])
def test_writebatch_put(benchmark, size):
    value = os.urandom(size)
    wb = WriteBatch()
    benchmark(wb.put, KEY, value)


def test_get_300b_x100(benchmark, loop, db):
    async def gets():
        for _ in range(GETS_PER_ROUND):
            value = await db.get(KEY)
        return value

    def run():
        return loop.run_until_complete(gets())

    value = benchmark(run)
    assert value is not None and len(value) == 300
    benchmark.extra_info["us_per_get"] = round(benchmark.stats.stats.mean / GETS_PER_ROUND * 1e6, 2)


def _shard_like_batch(n: int = 500) -> dict[bytes, bytes | None]:
    """A group-commit batch shaped like a loaded shard's: 30-60 B keys, 1/5 deletes,
    1/3 empty values (index rows), the rest 20-120 B records."""
    import random

    rng = random.Random(1)
    writes: dict[bytes, bytes | None] = {}
    while len(writes) < n:
        r = rng.random()
        writes[rng.randbytes(rng.randint(30, 60))] = (
            None if r < 0.2 else b"" if r < 0.55 else rng.randbytes(rng.randint(20, 120)))
    return writes


@pytest.mark.parametrize(("impl", "hold_gil"), [("python", False), ("python", True), ("c", True)],
                         ids=["python-cdll", "python-pydll", "c"])
def test_batch_writer_fill_500_keys(benchmark, impl, hold_gil):
    """silo.storage.db's hot path: one WriteBatch filled by ffi.batch_writer(); per key
    in extra_info['us_per_key'] (min of the rounds: the least load-sensitive figure).
    `python-*`: the pure ctypes fill with the GIL released (CDLL) or kept (PyDLL) per
    call; `c`: silo.storage._fill (keeps the GIL; skipped if the extension is not built)."""
    if hold_gil:
        ffi.apply(hold_gil=True)  # process-wide: the pydll cases run last
    try:
        fill = ffi.batch_writer(native=impl == "c")
    except ImportError:
        pytest.skip("silo.storage._fill is not built")
    assert fill.impl == impl
    writes = _shard_like_batch()
    batches = []

    def setup():
        batches.append(WriteBatch())
        return (batches[-1], writes), {}

    benchmark.pedantic(fill, setup=setup, rounds=300, iterations=1)
    benchmark.extra_info["us_per_key"] = round(benchmark.stats.stats.min / len(writes) * 1e6, 2)
