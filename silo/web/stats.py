"""Live per-task-group figures of the whole node, from every worker process's memory.

A task group's ready-queue depth, its running attempts and its recent enqueue and
completion counts (silo.observability.rates) live in the memory of the process that
owns each shard; none of it is in storage or the SQL tables in a form that is cheap to
read. So each process answers a forwarded `web.stats@local` call with its own figures
(registered on the service's extra local methods, like the worker stream's), and the
page adds up the answers of all processes. Cost: O(task groups + leases) per process,
plus, per task group with pending tasks, a key-only count of its task rows (0x05) that
start in the future (the part of the group's range after now, at most FUTURE_CAP rows
per shard: beyond it the page shows "N+"; at 1M jobs with 20,000 future rows a cap of
2,000 still cost ~250 ms, 500 costs ~50 ms), which splits the pending tasks into due and
future without reading any job (the task rows are the same ones the pending count counts).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from slatedb.uniffi import KeyRange

from silo.observability import rates
from silo.rpc.service import SiloService
from silo.storage import keys

METHOD = "web.stats@local"
FUTURE_CAP = 500  # future task rows counted per group and shard, at most
_FULL = 1024

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


async def future_tasks(shard: Any, group: str, now: int, cap: int = FUTURE_CAP) -> int:
    """Task rows of a group on a shard that start after now, or cap + 1 when there are
    more than cap (a key-range count)."""
    start = keys.task(group, now + 1, 0, "", 0, "")  # the first key starting after now
    end = keys.prefix_end(keys.task_group_prefix(group))
    it = await shard.db.scan(KeyRange(start=start, start_inclusive=True, end=end,
                                      end_inclusive=False))
    n = 0
    while n <= cap:
        batch = await it.next_batch(min(_FULL, cap + 1 - n))
        if not batch:
            break
        n += len(batch)
    return min(n, cap + 1)  # cap + 1: more than cap


async def local_figures(node: Any) -> dict[str, Any]:
    """This process's figures: rates, and per task group [pending tasks, running,
    future tasks, 1 if a future count stopped at FUTURE_CAP]."""
    groups: dict[str, list[int]] = {}
    for shard in list(node.shards.values()):
        # Pending tasks live in storage behind a bounded buffer (silo.shard.buffer);
        # the shard keeps a per-group count of its task rows.
        now = shard.now()
        for group, n in list(shard.depth.items()):
            row = groups.setdefault(group, [0, 0, 0, 0])
            row[0] += max(0, n)
            if n > 0:
                future = await future_tasks(shard, group, now)
                row[2] += min(future, FUTURE_CAP)
                row[3] |= future > FUTURE_CAP
        for lease in list(shard.leases.values()):
            group = getattr(lease.task, "task_group", None)
            if group is not None:
                groups.setdefault(group, [0, 0, 0, 0])[1] += 1
    return {"rates": rates.RATES.snapshot(), "groups": groups}


async def _serve_local(svc: SiloService, _payload: bytes) -> bytes:
    return _enc.encode(await local_figures(svc.node))


SiloService.EXTRA_LOCAL[METHOD] = _serve_local


class NodeFigures:
    """Every process's figures added up, and the processes that did not answer.

    Per group: pending (task rows, the shard's depth count), scheduled (task rows that
    start in the future), due = pending − scheduled, running (leased attempts); capped:
    some shard had more future rows than it counted (scheduled is a lower bound, due an
    upper one)."""

    def __init__(self, parts: list[dict[str, Any]], missing: list[str]) -> None:
        self.missing = missing
        self.now_bucket, self.series = rates.merge([p["rates"] for p in parts])
        self.groups: dict[str, dict[str, int | None]] = {}
        for p in parts:
            for g, (pending, running, future, capped) in p["groups"].items():
                row = self.groups.setdefault(str(g), {"pending": 0, "running": 0,
                                                      "scheduled": 0, "capped": 0})
                row["pending"] = int(row["pending"] or 0) + pending
                row["running"] = int(row["running"] or 0) + running
                row["scheduled"] = int(row["scheduled"] or 0) + future
                row["capped"] = int(row["capped"] or 0) | capped
        for g in list(self.series):
            self.groups.setdefault(g, {"pending": 0, "running": 0, "scheduled": 0,
                                       "capped": 0})
        for row in self.groups.values():
            row["due"] = max(0, int(row["pending"] or 0) - int(row["scheduled"] or 0))

    def per_second(self, group: str) -> tuple[list[float], list[float]]:
        """(enqueued/s, completed/s) per bucket, oldest first."""
        enq, done = self.series.get(group, ([0] * rates.BUCKETS, [0] * rates.BUCKETS))
        return [x / rates.BUCKET_S for x in enq], [x / rates.BUCKET_S for x in done]


async def node_figures(backend: Any) -> NodeFigures:
    """Ask every worker process of the node (this one in process) for its figures, all
    at once."""
    backend.as_caller()
    node = backend.node
    others = sorted(i for i in node.peers if i != node.index)

    async def ask(i: int) -> dict[str, Any]:
        return _dec.decode(await node.peers[i].call(METHOD, b""))

    mine, *answers = await asyncio.gather(local_figures(node), *(ask(i) for i in others),
                                          return_exceptions=True)
    if isinstance(mine, BaseException):
        raise mine
    parts = [mine]
    missing = []
    for i, a in zip(others, answers, strict=True):
        if isinstance(a, BaseException):
            missing.append(f"w{i}")
        else:
            parts.append(a)
    return NodeFigures(parts, missing)
