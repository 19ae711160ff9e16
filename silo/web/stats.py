"""Live per-task-group figures of the whole node, from every worker process's memory.

A task group's ready-queue depth, its running attempts and its recent enqueue and
completion counts (silo.observability.rates) live in the memory of the process that
owns each shard; none of it is in storage or the SQL tables in a form that is cheap to
read. So each process answers a forwarded `web.stats@local` call with its own figures
(registered on the service's extra local methods, like the worker stream's), and the
page adds up the answers of all processes. Cost: O(task groups + leases) per process,
plus one SQL statement that reads the future part of the status index (jobs scheduled
for later) to split pending tasks into due and future.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from silo.observability import rates
from silo.rpc.service import SiloService

METHOD = "web.stats@local"
# Tasks not yet due, per task group: the future rows of the status index (usually few;
# the engine reads only those), so no task rows are walked.
FUTURE_SQL = ("SELECT task_group, COUNT(*) AS n FROM jobs WHERE status_kind = 'Scheduled' "
              "GROUP BY task_group")

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def local_figures(node: Any) -> dict[str, Any]:
    """This process's figures: rates, and per task group [pending tasks, running]."""
    groups: dict[str, list[int]] = {}
    for shard in list(node.shards.values()):
        # Pending tasks live in storage behind a bounded buffer (silo.shard.buffer);
        # the shard keeps a per-group count of its task rows.
        for group, n in list(shard.depth.items()):
            groups.setdefault(group, [0, 0])[0] += max(0, n)
        for lease in list(shard.leases.values()):
            group = getattr(lease.task, "task_group", None)
            if group is not None:
                groups.setdefault(group, [0, 0])[1] += 1
    return {"rates": rates.RATES.snapshot(), "groups": groups}


async def _serve_local(svc: SiloService, _payload: bytes) -> bytes:
    return _enc.encode(local_figures(svc.node))


SiloService.EXTRA_LOCAL[METHOD] = _serve_local


class NodeFigures:
    """Every process's figures added up, and the processes that did not answer.

    Per group: pending (task rows, the shard's depth count), scheduled (jobs whose next attempt
    is in the future; None when they could not be counted), due = pending − scheduled,
    running (leased attempts)."""

    def __init__(self, parts: list[dict[str, Any]], missing: list[str],
                 future: dict[str, int] | None) -> None:
        self.missing = missing
        self.now_bucket, self.series = rates.merge([p["rates"] for p in parts])
        self.groups: dict[str, dict[str, int | None]] = {}
        for p in parts:
            for g, (pending, running) in p["groups"].items():
                row = self.groups.setdefault(str(g), {"pending": 0, "running": 0})
                row["pending"] = int(row["pending"] or 0) + pending
                row["running"] = int(row["running"] or 0) + running
        for g in list(self.series) + list(future or {}):
            self.groups.setdefault(g, {"pending": 0, "running": 0})
        for g, row in self.groups.items():
            if future is None:
                row["scheduled"] = row["due"] = None
            else:
                row["scheduled"] = future.get(g, 0)
                row["due"] = max(0, int(row["pending"] or 0) - future.get(g, 0))

    def per_second(self, group: str) -> tuple[list[float], list[float]]:
        """(enqueued/s, completed/s) per bucket, oldest first."""
        enq, done = self.series.get(group, ([0] * rates.BUCKETS, [0] * rates.BUCKETS))
        return [x / rates.BUCKET_S for x in enq], [x / rates.BUCKET_S for x in done]


async def node_figures(backend: Any) -> NodeFigures:
    """Ask every worker process of the node (this one in process) for its figures, and
    the engine for the future-scheduled jobs per group, all at once."""
    from silo.web.backend import BackendError  # noqa: PLC0415 - backend imports nothing of ours

    backend.as_caller()
    node = backend.node
    others = sorted(i for i in node.peers if i != node.index)

    async def ask(i: int) -> dict[str, Any]:
        return _dec.decode(await node.peers[i].call(METHOD, b""))

    async def future() -> dict[str, int] | None:
        try:
            table = await backend.query_all(FUTURE_SQL)
        except BackendError:
            return None  # e.g. the statement timed out: shown as unknown
        return {str(r["task_group"]): int(r["n"]) for r in table.to_pylist()}

    fut, *answers = await asyncio.gather(future(), *(ask(i) for i in others),
                                         return_exceptions=True)
    parts = [local_figures(node)]
    missing = []
    for i, a in zip(others, answers, strict=True):
        if isinstance(a, BaseException):
            missing.append(f"w{i}")
        else:
            parts.append(a)
    return NodeFigures(parts, missing, None if isinstance(fut, BaseException) else fut)
