"""Concurrency queues: all of them with holders and waiters, and one queue's entries.

Both read the `queues` table (holder rows and the in-memory waiting tickets; §7) and
`queue_counts` (limit type and current maximum, from the in-memory limit cache) over
all shards, per tenant. Neither table grows with the number of finished jobs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from silo.web.app import BACKEND, param, render
from silo.web.view import fmt_ms

routes = web.RouteTableDef()

MAX_QUEUES = 500
MAX_ENTRIES = 1000
MAX_NAME = 256


def _limits(table) -> dict[tuple[str, str], tuple[Any, Any]]:
    return {(r["tenant"], r["queue_name"]): (r["max_concurrency"], r["limit_type"])
            for r in table.to_pylist()}


def queue_rows(counts: list[dict], limits: dict[tuple[str, str], tuple[Any, Any]]
               ) -> list[dict[str, Any]]:
    """Per (tenant, queue): holders, waiters, total, limit; most holders first."""
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for r in counts:
        k = (r["tenant"], r["queue_name"])
        row = by.setdefault(k, {"tenant": k[0], "name": k[1], "holders": 0, "waiters": 0})
        row["holders" if r["entry_type"] == "holder" else "waiters"] += int(r["n"])
    for k in limits:
        by.setdefault(k, {"tenant": k[0], "name": k[1], "holders": 0, "waiters": 0})
    for k, row in by.items():
        row["total"] = row["holders"] + row["waiters"]
        row["max"], row["kind"] = limits.get(k, (None, None))
    return sorted(by.values(), key=lambda r: (-r["holders"], -r["waiters"], r["tenant"],
                                              r["name"]))


@routes.get("/queues")
async def queues_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    tenant = param(request, "tenant", max_len=64)
    where, params = (" WHERE tenant = $1", [tenant]) if tenant else ("", [])
    t0 = time.perf_counter()
    counts, limits = await asyncio.gather(  # both at once: the page waits for one
        backend.query_all(
            "SELECT tenant, queue_name, entry_type, COUNT(*) AS n FROM queues" + where
            + " GROUP BY tenant, queue_name, entry_type", params),
        backend.query_all(
            "SELECT tenant, queue_name, max_concurrency, limit_type FROM queue_counts"
            + where, params))
    rows = queue_rows(counts.to_pylist(), _limits(limits))
    return render(request, "queues.html", title="Queues", refresh=5, rows=rows[:MAX_QUEUES],
                  total=len(rows), tenant=tenant, max_queues=MAX_QUEUES,
                  took_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")


@routes.get("/queue")
async def queue_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    name = param(request, "name", required=True, max_len=MAX_NAME)
    tenant = param(request, "tenant", max_len=64)
    where, params = "queue_name = $1", [name]
    if tenant:
        where, params = where + " AND tenant = $2", params + [tenant]
    t0 = time.perf_counter()
    entries, info = await asyncio.gather(
        backend.query_all(
            "SELECT shard_id, tenant, entry_type, task_id, job_id, priority, timestamp_ms "
            f"FROM queues WHERE {where} ORDER BY entry_type, timestamp_ms, task_id "
            f"LIMIT {MAX_ENTRIES + 1}", params),
        backend.query_all(
            "SELECT tenant, holders, requesters, max_concurrency, limit_type "
            f"FROM queue_counts WHERE {where}", params))
    rows = entries.to_pylist()
    for r in rows:
        r["at"] = fmt_ms(r["timestamp_ms"])
    return render(request, "queue.html", title=f"Queue {name}", refresh=5, name=name,
                  tenant=tenant, holders=[r for r in rows[:MAX_ENTRIES]
                                          if r["entry_type"] == "holder"],
                  waiters=[r for r in rows[:MAX_ENTRIES] if r["entry_type"] != "holder"],
                  truncated=len(rows) > MAX_ENTRIES, max_entries=MAX_ENTRIES,
                  limits=info.to_pylist(),
                  took_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")
