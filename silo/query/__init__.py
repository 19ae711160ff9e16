"""SQL over a shard's jobs, tasks and queues (behaviour.md §7), evaluated by DataFusion.

A statement is planned once against empty tables to learn which tables it reads and
what its filters pin down (plan.py); only the matching rows are read from the shard,
through the status and metadata indexes where possible, with a pushed-down LIMIT when
sound (scan.py, ranges.py), paced so the shard's loop keeps serving (pace.py);
DataFusion then evaluates the whole statement over those rows (engine.py). cluster.py
runs one statement over every shard of the node at once.
"""
