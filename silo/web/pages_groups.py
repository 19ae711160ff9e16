"""Task groups: live depth (ready, scheduled, running) and the last 15 minutes' enqueue
and completion rates, for all groups and for one with its chart.

Depths and rates come from every worker process's memory (silo.web.stats), so these
pages cost the same with a million finished jobs as with none. Counts by status of one
group are not kept by any counter (the status counters are per tenant), so they need a
scan of every job: the group page runs it only when asked (`counts=1`) and says so.
"""

from __future__ import annotations

import time

from aiohttp import web

from silo.observability import rates
from silo.web import stats
from silo.web.app import BACKEND, bad_request, render, url
from silo.web.chart import line_chart

routes = web.RouteTableDef()

MAX_NAME = 256
RECENT_BUCKETS = 6  # the "last minute" rate


def _recent(values: list[float]) -> float:
    tail = values[-RECENT_BUCKETS - 1 : -1] or values  # the current bucket is partial
    return sum(tail) / max(1, len(tail))


def group_rows(figures: stats.NodeFigures) -> list[dict]:
    rows = []
    for g, d in sorted(figures.groups.items()):
        enq, done = figures.per_second(g)
        rows.append({"name": g, **d, "enq_s": _recent(enq), "done_s": _recent(done)})
    return rows


@routes.get("/groups")
async def groups_page(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    figures = await stats.node_figures(request.app[BACKEND])
    return render(request, "groups.html", title="Task groups", refresh=5,
                  rows=group_rows(figures), missing=figures.missing,
                  took_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")


@routes.get("/group")
async def group_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    if "name" not in request.query:
        raise bad_request("missing parameter: name (empty for the default task group)")
    name = request.query["name"]
    if len(name) > MAX_NAME:
        raise bad_request(f"parameter name is too long (max {MAX_NAME} characters)")
    want_counts = request.query.get("counts", "") == "1"
    t0 = time.perf_counter()
    figures = await stats.node_figures(backend)
    d = figures.groups.get(name, {"pending": 0, "due": 0, "running": 0, "scheduled": 0,
                                  "capped": 0})
    enq, done = figures.per_second(name)
    chart = line_chart([("enqueued", enq), ("completed", done)],
                       seconds_per_point=rates.BUCKET_S,
                       title=f"task group {name or '(default)'}: jobs per second")
    counts: list[dict] = []
    counts_ms = ""
    if want_counts:
        c0 = time.perf_counter()
        table = await backend.query_all(
            "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE task_group = $1 "
            "GROUP BY status_kind ORDER BY status_kind", [name])
        counts = table.to_pylist()
        counts_ms = f"{(time.perf_counter() - c0) * 1000:.1f}"
    capped = bool(d.get("capped"))
    tiles = [("ready (due)", f"≤{d['due']}" if capped else d["due"]),
             ("scheduled (future)", f"{d['scheduled']}+" if capped else d["scheduled"]),
             ("running", d["running"]), ("pending tasks", d["pending"]),
             ("enqueued/s (1 min)", round(_recent(enq), 1)),
             ("completed/s (1 min)", round(_recent(done), 1))]
    return render(request, "group.html", title=f"Task group {name or '(default)'}",
                  refresh=None if want_counts else 10, name=name, tiles=tiles, chart=chart,
                  counts=counts, want_counts=want_counts, counts_ms=counts_ms,
                  counts_url=url("/group", name=name, counts="1") if name else
                  "/group?name=&counts=1",
                  jobs_url=url("/jobs", group=name), missing=figures.missing,
                  took_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")
