"""The job list: every job of the node, filtered, newest first, a page at a time
(by enqueue time; with a status filter by the status' own time, which the page says).

One parameterised SQL statement over all shards per page (silo.web.joblist builds
it); the filters map onto the engine's index reads, pagination is keyset (see
joblist), so neither filters nor page depth turn into string-formatted SQL or OFFSET.
"""

from __future__ import annotations

import time

from aiohttp import web

from silo.web import joblist
from silo.web.app import BACKEND, bad_request, param, render, url
from silo.web.backend import BackendError
from silo.web.view import fmt_ms

routes = web.RouteTableDef()

MAX_ID = 128
# The engine gave up (statement timeout, admission): the form stays, with a hint.
TOO_BIG = {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
MAX_TEXT = 256


def _filters(request: web.Request) -> joblist.Filters:
    try:
        status = joblist.parse_status(param(request, "status", max_len=16))
    except joblist.BadFilter as e:
        raise bad_request(str(e)) from None
    key = param(request, "key", max_len=MAX_TEXT)
    value = request.query.get("value", "")
    if len(value) > MAX_TEXT:
        raise bad_request(f"parameter value is too long (max {MAX_TEXT} characters)")
    match = param(request, "match", max_len=8) or "exact"
    if match not in ("exact", "prefix"):
        raise bad_request("match must be exact or prefix")
    if value and not key:
        raise bad_request("a metadata value needs its key")
    group = param(request, "group", max_len=MAX_TEXT)
    tenant = param(request, "tenant", max_len=64)
    return joblist.Filters(status=status, task_group=group or None, tenant=tenant or None,
                           meta_key=key, meta_value=value, meta_prefix=match == "prefix",
                           job_id=param(request, "id", max_len=MAX_ID))


def _per_page(request: web.Request) -> int:
    raw = param(request, "per_page", max_len=6)
    if not raw:
        return joblist.DEFAULT_PER_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= joblist.MAX_PER_PAGE:
        raise bad_request(f"per_page must be 1..{joblist.MAX_PER_PAGE}")
    return int(raw)


def _cursor(request: web.Request) -> joblist.Cursor | None:
    older, newer = param(request, "older", max_len=400), param(request, "newer", max_len=400)
    if older and newer:
        raise bad_request("give older or newer, not both")
    try:
        if older:
            return joblist.Cursor.decode(older, older=True)
        if newer:
            return joblist.Cursor.decode(newer, older=False)
    except joblist.BadFilter as e:
        raise bad_request(str(e)) from None
    return None


def filter_query(f: joblist.Filters, per_page: int) -> dict[str, str]:
    """The query-string form of the filters (for links to other pages of the list)."""
    return {k: v for k, v in {
        "status": f.status, "group": f.task_group or "", "tenant": f.tenant or "",
        "key": f.meta_key, "value": f.meta_value,
        "match": "prefix" if f.meta_prefix else "", "id": f.job_id,
        "per_page": "" if per_page == joblist.DEFAULT_PER_PAGE else str(per_page),
    }.items() if v}


@routes.get("/jobs")
async def jobs_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    f = _filters(request)
    per_page = _per_page(request)
    cursor = _cursor(request)
    sql, params = joblist.build(f, cursor, per_page + 1)
    t0 = time.perf_counter()
    error, status = "", 200
    try:
        found = (await backend.query_all(sql, params)).to_pylist()
    except BackendError as e:
        if e.code.name not in TOO_BIG:
            raise
        found, error, status = [], str(e), e.http_status
    took = (time.perf_counter() - t0) * 1000
    col = joblist.order_column(f)
    rows, older, newer = joblist.page_of(found, cursor, per_page, col)
    for r in rows:
        r["enqueued"] = fmt_ms(r["enqueue_time_ms"])
        r["changed"] = fmt_ms(r["status_changed_at_ms"])
    q = filter_query(f, per_page)
    return render(
        request, "jobs.html", status=status, title="Jobs", error=error, rows=rows, f=f, q=q, per_page=per_page,
        statuses=joblist.STATUSES, took_ms=f"{took:.1f}",
        order_label=joblist.ORDER_LABEL[col],
        older_url=url("/jobs", **q, older=older.encode()) if older else "",
        newer_url=url("/jobs", **q, newer=newer.encode()) if newer else "",
        newest_url=url("/jobs", **q) if cursor is not None else "")
