"""Live per-task-group figures of the whole node, from every worker process's memory.

A task group's ready-queue depth, its running attempts and its recent enqueue and
completion counts (silo.observability.rates) live in the memory of the process that
owns each shard; none of it is in storage or the SQL tables in a form that is cheap to
read. So each process answers a forwarded `web.stats@local` call with its own figures
(registered on the service's extra local methods, like the worker stream's), and the
page adds up the answers of all processes. Cost: O(task groups + leases) per process,
plus a bounded walk of each ready heap to split due from future tasks.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from silo.observability import rates
from silo.rpc.service import SiloService
from silo.storage import keys

METHOD = "web.stats@local"
# Most heap entries one shard's walk visits to count due tasks; beyond it the split
# between due and future tasks is not shown (the totals always are).
WALK_BUDGET = 20_000

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def due_count(heap: list[bytes], prefix_len: int, now_ms: int, budget: int = WALK_BUDGET
              ) -> int | None:
    """How many entries of a task heap start at or before now, or None past `budget`.

    A heap's parent never starts later than its children, so the due entries form a
    subtree at the root: only they and their first future children are visited."""
    n = len(heap)
    if not n:
        return 0
    due, seen = 0, 0
    stack = [0]
    while stack:
        i = stack.pop()
        seen += 1
        if seen > budget:
            return None
        if keys.task_start_ms(heap[i], prefix_len) <= now_ms:
            due += 1
            for c in (2 * i + 1, 2 * i + 2):
                if c < n:
                    stack.append(c)
    return due


def local_figures(node: Any, now_ms: int | None = None) -> dict[str, Any]:
    """This process's figures: rates, and per task group [pending, due or -1, running]."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    groups: dict[str, list[int]] = {}
    for shard in list(node.shards.values()):
        for group, q in list(shard.queues.items()):
            g = groups.setdefault(group, [0, 0, 0])
            pending = max(0, len(q.heap) - q.stale)
            g[0] += pending
            due = due_count(q.heap, q.prefix_len, now_ms) if g[1] >= 0 else None
            g[1] = -1 if due is None else g[1] + min(due, pending)
        for lease in list(shard.leases.values()):
            group = getattr(lease.task, "task_group", None)
            if group is not None:
                groups.setdefault(group, [0, 0, 0])[2] += 1
    return {"rates": rates.RATES.snapshot(), "groups": groups}


async def _serve_local(svc: SiloService, _payload: bytes) -> bytes:
    return _enc.encode(local_figures(svc.node))


SiloService.EXTRA_LOCAL[METHOD] = _serve_local


class NodeFigures:
    """Every process's figures added up, and the processes that did not answer."""

    def __init__(self, parts: list[dict[str, Any]], missing: list[str]) -> None:
        self.missing = missing
        self.now_bucket, self.series = rates.merge([p["rates"] for p in parts])
        self.groups: dict[str, dict[str, int | None]] = {}
        for p in parts:
            for g, (pending, due, running) in p["groups"].items():
                row = self.groups.setdefault(str(g), {"pending": 0, "due": 0, "running": 0})
                row["pending"] = int(row["pending"] or 0) + pending
                row["running"] = int(row["running"] or 0) + running
                if due < 0 or row["due"] is None:
                    row["due"] = None
                else:
                    row["due"] += due
        for g in self.series:
            self.groups.setdefault(g, {"pending": 0, "due": 0, "running": 0})
        for row in self.groups.values():
            row["scheduled"] = (None if row["due"] is None
                                else int(row["pending"] or 0) - int(row["due"]))

    def per_second(self, group: str) -> tuple[list[float], list[float]]:
        """(enqueued/s, completed/s) per bucket, oldest first."""
        enq, done = self.series.get(group, ([0] * rates.BUCKETS, [0] * rates.BUCKETS))
        return [x / rates.BUCKET_S for x in enq], [x / rates.BUCKET_S for x in done]


async def node_figures(backend: Any) -> NodeFigures:
    """Ask every worker process of the node (this one in process) for its figures."""
    backend.as_caller()
    node = backend.node
    others = sorted(i for i in node.peers if i != node.index)

    async def ask(i: int) -> dict[str, Any]:
        return _dec.decode(await node.peers[i].call(METHOD, b""))

    answers = await asyncio.gather(*(ask(i) for i in others), return_exceptions=True)
    parts = [local_figures(node)]
    missing = []
    for i, a in zip(others, answers, strict=True):
        if isinstance(a, BaseException):
            missing.append(f"w{i}")
        else:
            parts.append(a)
    return NodeFigures(parts, missing)
