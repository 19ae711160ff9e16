"""A shard's SlateDB metrics recorder registers only the metrics Silo exports.

SlateDB registers ~165 metrics per database open, each a call from Rust into Python;
the recorder hands the unexported ones a shared native sink instead of registering
them (half the CPU of an open), while the exported ones stay real and count.
"""

from __future__ import annotations

import asyncio

from silo.observability.metrics import SLATEDB_NAMES
from silo.storage import slatedb_metrics
from silo.storage.database import METRICS_RECORDERS, open_database
from silo.storage.db import GroupCommitter


def test_only_exported_metrics_are_registered_and_they_count(tmp_path):
    calls: list[str] = []

    class Counting(slatedb_metrics.ExportedRecorder):
        def register_counter(self, name, description, labels):
            calls.append(name)
            return super().register_counter(name, description, labels)

        def register_histogram(self, name, description, labels, boundaries):
            calls.append(name)
            return super().register_histogram(name, description, labels, boundaries)

    async def main():
        real = slatedb_metrics.ExportedRecorder
        import silo.storage.database as database_mod

        database_mod.ExportedRecorder = Counting
        try:
            db = await open_database(f"file://{tmp_path}", "shards/m", flush_interval_ms=1,
                                     l0_sst_size_bytes=1 << 20)
        finally:
            database_mod.ExportedRecorder = real
        c = GroupCommitter(db, commit_interval_s=0)
        for i in range(5):
            c.put(b"k%d" % i, b"v")
            await c.commit()
        await c.close()
        snap = METRICS_RECORDERS["shards/m"].snapshot()
        await db.shutdown()
        return snap

    snap = asyncio.run(main())
    names = {m.name for m in snap}
    assert names <= SLATEDB_NAMES, names - SLATEDB_NAMES
    assert len(set(calls) - SLATEDB_NAMES) > 20  # SlateDB asked for many more...
    assert slatedb_metrics._sinks  # ...which went to the sinks
    batches = [m for m in snap if m.name == "slatedb.db.write_batch_count"]
    assert batches and sum(m.value[0] for m in batches) >= 5
