"""The five query tables: exactly upstream Silo's column names and Arrow types.

Fields are nullable throughout: a column a statement does not read is left null
rather than decoded (see scan.py), and nullability is not part of the wire contract
(clients see the type names only).
"""

from __future__ import annotations

import pyarrow as pa

_S = pa.utf8()

JOBS = pa.schema([
    ("shard_id", _S), ("tenant", _S), ("id", _S), ("priority", pa.uint8()),
    ("enqueue_time_ms", pa.int64()), ("payload", _S), ("status_kind", _S),
    ("status_changed_at_ms", pa.int64()), ("task_group", _S),
    ("current_attempt", pa.uint32()), ("next_attempt_starts_after_ms", pa.int64()),
    ("metadata", pa.map_(_S, _S)), ("limits", _S),
])

TASKS = pa.schema([
    ("shard_id", _S), ("tenant", _S), ("task_group", _S), ("start_time_ms", pa.int64()),
    ("priority", pa.uint8()), ("job_id", _S), ("attempt", pa.uint32()),
    ("variant_type", _S), ("task_id", _S), ("held_queues", _S),
])

QUEUES = pa.schema([
    ("shard_id", _S), ("tenant", _S), ("queue_name", _S), ("entry_type", _S),
    ("task_id", _S), ("job_id", _S), ("priority", pa.uint8()), ("timestamp_ms", pa.int64()),
])

TENANT_COUNTS = pa.schema([
    ("shard_id", _S), ("tenant", _S), ("status_kind", _S), ("cnt", pa.int64()),
])

QUEUE_COUNTS = pa.schema([
    # Counts are Int64 upstream (not UInt32 like the jobs table's attempt numbers).
    ("shard_id", _S), ("tenant", _S), ("queue_name", _S), ("holders", pa.int64()),
    ("requesters", pa.int64()), ("max_concurrency", pa.int64()), ("limit_type", _S),
])

TABLES: dict[str, pa.Schema] = {
    "jobs": JOBS,
    "tasks": TASKS,
    "queues": QUEUES,
    "tenant_counts": TENANT_COUNTS,
    "queue_counts": QUEUE_COUNTS,
}

# Status words accepted in filters (behaviour.md §7) → the word the column shows.
STATUS_WORDS: dict[str, str] = {
    "waiting": "Waiting",
    "scheduled": "Scheduled",
    "running": "Running",
    "failed": "Failed",
    "cancelled": "Cancelled",
    "canceled": "Cancelled",
    "succeeded": "Succeeded",
    "success": "Succeeded",
}


def canonical_status(word: str) -> str | None:
    return STATUS_WORDS.get(word.lower())
