"""The SQL console: one read-only statement over every shard, one shard, or one tenant's.

The statement goes to the engine as the operator typed it (the engine refuses anything
but a read-only SELECT); its rows are shown up to MAX_ROWS with the column types and
the time it took; a bad statement shows the engine's own message, escaped like every
other text. GET, so a query is a link one can share (it changes nothing).
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
from aiohttp import web

from silo.query import wire
from silo.web.app import BACKEND, bad_request, param, render
from silo.web.backend import BackendError
from silo.web.pages_cluster import shard_id_param

routes = web.RouteTableDef()

MAX_ROWS = 1000
MAX_SQL = 20_000
EXAMPLES = (
    "SELECT status_kind, COUNT(*) AS n FROM jobs GROUP BY status_kind ORDER BY n DESC",
    "SELECT task_group, variant_type, COUNT(*) AS n FROM tasks GROUP BY task_group, "
    "variant_type",
    "SELECT queue_name, entry_type, COUNT(*) AS n FROM queues GROUP BY queue_name, entry_type",
    "SELECT tenant, status_kind, cnt FROM tenant_counts ORDER BY tenant",
)
_dec = msgspec.msgpack.Decoder()


def cell(v: Any) -> str | None:
    """A value as text (None stays None: shown as NULL)."""
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.hex(" ")
    if isinstance(v, list) and v and all(isinstance(x, tuple) and len(x) == 2 for x in v):
        return json.dumps(dict(v), ensure_ascii=False)  # a map column
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def _from_table(table) -> tuple[list[tuple[str, str]], list[list[str | None]], int]:
    cols = wire.columns(table.schema)  # the type names the Query RPC reports
    head = table.slice(0, MAX_ROWS).to_pylist()
    rows = [[cell(r[name]) for name, _ in cols] for r in head]
    return cols, rows, table.num_rows


def _from_response(resp) -> tuple[list[tuple[str, str]], list[list[str | None]], int]:
    cols = [(c.name, c.data_type) for c in resp.columns]
    rows = []
    for r in resp.rows[:MAX_ROWS]:
        doc = _dec.decode(r.msgpack)
        rows.append([cell(doc.get(name)) for name, _ in cols])
    return cols, rows, resp.row_count or len(resp.rows)


@routes.get("/sql")
@routes.get("/sql/execute")
async def sql_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    sql = request.query.get("q", "")
    if len(sql) > MAX_SQL:
        raise bad_request(f"the statement is too long (max {MAX_SQL} characters)")
    shard = param(request, "shard")
    if shard:
        shard = shard_id_param(shard)
    tenant = param(request, "tenant", max_len=64)
    if tenant and shard:
        raise bad_request("choose a shard or a tenant, not both")
    if tenant:
        shard = backend.node.shard_map.shard_for_tenant(tenant).shard_id
    ctx: dict[str, Any] = {"sql": sql, "shard": shard, "tenant": tenant, "error": "",
                           "cols": [], "rows": [], "total": 0, "took_ms": "",
                           "examples": EXAMPLES, "max_rows": MAX_ROWS,
                           "shards": [e.shard_id for e in backend.node.shard_map.entries]}
    status = 200
    if sql.strip():
        t0 = time.perf_counter()
        try:
            if shard:
                cols, rows, total = _from_response(await backend.query_shard(shard, sql))
            else:
                cols, rows, total = _from_table(await backend.query_all(sql))
        except BackendError as e:
            ctx["error"] = str(e)
            status = e.http_status if e.http_status < 500 else 200
        else:
            ctx.update(cols=cols, rows=rows, total=total)
        ctx["took_ms"] = f"{(time.perf_counter() - t0) * 1000:.1f}"
    return render(request, "sql.html", status=status, title="SQL", **ctx)
