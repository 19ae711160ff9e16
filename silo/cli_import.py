"""``silo import FILE.jsonl``: bulk-import jobs with their history, one JSON job per line.

Each line is an object with the fields of the SDK's ImportJob::

    {"id": "job-1", "task_group": "emails", "payload": {...}, "tenant": "t1",
     "priority": 50, "enqueue_time_ms": 0, "start_at_ms": 0, "metadata": {"k": "v"},
     "retry_policy": {"retry_count": 3, "initial_interval_ms": 1000},
     "limits": [{"type": "concurrency", "key": "q", "max_concurrency": 2}],
     "attempts": [{"status": "failed", "started_at_ms": 1, "finished_at_ms": 2,
                   "error_code": "E", "error_data": {...}}]}

Jobs are sent in batches (``--batch``); progress goes to stderr after each batch and a
summary (counts by resulting status, then every failure with its line number) at the end.
A line that is not valid JSON or not a valid job is a failure of that line only. Exit
status 0 when every job was imported, 1 when any failed. ``-`` reads stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from silo.cli_client import _common, _emit_json, _fail, _run

MAX_FAILURES_SHOWN = 50
_ATTEMPT_STATUS = {"succeeded": 1, "failed": 2, "cancelled": 3}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSON Lines file, one job per line ('-' for stdin)")
    parser.add_argument("--batch", type=int, default=500, metavar="N",
                        help="jobs per ImportJobs call (default %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    _common(parser)


def job_from_json(doc: Any):
    """An SDK ImportJob from one parsed line; ValueError says what is wrong."""
    from silo.client import (
        ConcurrencyLimit,
        FloatingConcurrencyLimit,
        ImportAttempt,
        ImportJob,
        RateLimit,
        RetryPolicy,
    )
    from silo.client.types import AttemptStatus

    if not isinstance(doc, dict):
        raise ValueError("a line must be a JSON object")
    try:
        limits = []
        for lim in doc.get("limits") or []:
            kind = lim.get("type", "concurrency")
            fields = {k: v for k, v in lim.items() if k != "type"}
            cls = {"concurrency": ConcurrencyLimit, "rate_limit": RateLimit,
                   "floating_concurrency": FloatingConcurrencyLimit}.get(kind)
            if cls is None:
                raise ValueError(f"unknown limit type {kind!r}")
            limits.append(cls(**fields))
        attempts = []
        for a in doc.get("attempts") or []:
            status = _ATTEMPT_STATUS.get(str(a.get("status", "")).lower())
            if status is None:
                raise ValueError(f"attempt status must be one of {sorted(_ATTEMPT_STATUS)}")
            attempts.append(ImportAttempt(AttemptStatus(status), int(a["started_at_ms"]),
                                          int(a["finished_at_ms"]), a.get("result"),
                                          a.get("error_code"), a.get("error_data")))
        rp = doc.get("retry_policy")
        return ImportJob(
            id=str(doc["id"]), payload=doc.get("payload"), task_group=str(doc["task_group"]),
            tenant=doc.get("tenant"), priority=int(doc.get("priority", 50)),
            enqueue_time_ms=int(doc.get("enqueue_time_ms", 0)),
            start_at_ms=int(doc.get("start_at_ms", 0)),
            retry_policy=RetryPolicy(**rp) if rp is not None else None, limits=limits,
            metadata={str(k): str(v) for k, v in (doc.get("metadata") or {}).items()},
            attempts=attempts)
    except KeyError as e:
        raise ValueError(f"missing field {e.args[0]!r}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        return _fail("--batch must be >= 1", 2)
    try:
        f = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        return _fail(f"cannot read {args.file}: {e.strerror or e}", 2)

    async def body(client) -> int:
        statuses: Counter[str] = Counter()
        failures: list[tuple[int, str, str]] = []  # (line, id, error)
        batch: list[tuple[int, Any]] = []
        done = 0

        async def send() -> None:
            nonlocal done
            results = await client.import_jobs([j for _, j in batch])
            for (line, j), r in zip(batch, results, strict=True):
                if r.success:
                    statuses[getattr(r.status, "label", str(r.status))] += 1
                else:
                    failures.append((line, j.id, r.error or "refused"))
            done += len(batch)
            batch.clear()
            if not args.quiet:
                print(f"silo import: {done} jobs sent, {len(failures)} failed", file=sys.stderr)

        with f:
            for line_no, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    batch.append((line_no, job_from_json(json.loads(text))))
                except ValueError as e:
                    failures.append((line_no, "", f"bad line: {e}"))
                    continue
                if len(batch) >= args.batch:
                    await send()
            if batch:
                await send()
        imported = sum(statuses.values())
        failures.sort()
        if args.json:
            _emit_json({"imported": imported, "statuses": dict(statuses),
                        "failed": [{"line": ln, "id": i, "error": e} for ln, i, e in failures]})
        else:
            by_status = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
            print(f"imported {imported} jobs ({by_status}); {len(failures)} failed")
            for ln, i, e in failures[:MAX_FAILURES_SHOWN]:
                print(f"  line {ln}{f' (id {i})' if i else ''}: {e}")
            if len(failures) > MAX_FAILURES_SHOWN:
                print(f"  ... and {len(failures) - MAX_FAILURES_SHOWN} more")
        return 1 if failures else 0

    return _run(args, body)


COMMAND = ("import jobs with their history from a JSON Lines file", configure, run)
