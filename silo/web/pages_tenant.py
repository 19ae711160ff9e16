"""Tenants (only with tenancy on): all of them with their job counts, one tenant's shard
and counts, dropping its concurrency holders.

Counts come from the `tenant_counts` table, i.e. the per-shard status counters kept in
memory, never a scan of jobs; a tenant's shard comes from the tenant hash and the shard
map.
"""

from __future__ import annotations

from aiohttp import web

from silo.cluster.shardmap import hash_tenant
from silo.web.app import BACKEND, PageError, bad_request, param, redirect, render, url
from silo.web.backend import BackendError

routes = web.RouteTableDef()

MAX_TENANT = 64
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500
COUNT_COLUMNS = ("Scheduled", "Running", "Succeeded", "Failed", "Cancelled")


def _require_tenancy(request: web.Request) -> None:
    if not request.app[BACKEND].node.tenancy:
        raise PageError(404, "tenancy is off on this server: there are no tenants to show")


def _int_param(request: web.Request, name: str, default: int, top: int) -> int:
    raw = param(request, name, max_len=9)
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        raise bad_request(f"{name} must be 1..{top}")
    return int(raw)


def tenant_rows(counts: list[dict]) -> list[dict]:
    """One row per tenant: its count per stored status and in total, by name."""
    by: dict[str, dict] = {}
    for r in counts:
        row = by.setdefault(r["tenant"], {"name": r["tenant"], "total": 0,
                                          **dict.fromkeys(COUNT_COLUMNS, 0)})
        row[r["status_kind"]] = row.get(r["status_kind"], 0) + int(r["n"])
        row["total"] += int(r["n"])
    return [by[k] for k in sorted(by)]


@routes.get("/tenants")
async def tenants_page(request: web.Request) -> web.Response:
    _require_tenancy(request)
    page = _int_param(request, "page", 1, 10**9)
    per_page = _int_param(request, "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE)
    table = await request.app[BACKEND].query_all(
        "SELECT tenant, status_kind, SUM(cnt) AS n FROM tenant_counts "
        "GROUP BY tenant, status_kind")
    rows = tenant_rows(table.to_pylist())
    pages = max(1, -(-len(rows) // per_page))
    shown = rows[(page - 1) * per_page : page * per_page]
    pp = "" if per_page == DEFAULT_PER_PAGE else str(per_page)
    return render(request, "tenants.html", title="Tenants", refresh=10, rows=shown,
                  columns=COUNT_COLUMNS, total=len(rows), page=page, pages=pages,
                  prev_url=url("/tenants", page=str(page - 1), per_page=pp) if page > 1 else "",
                  next_url=url("/tenants", page=str(page + 1), per_page=pp)
                  if page < pages else "")


@routes.get("/tenant")
async def tenant_page(request: web.Request) -> web.Response:
    _require_tenancy(request)
    name = param(request, "name", required=True, max_len=MAX_TENANT)
    node = request.app[BACKEND].node
    entry = node.shard_map.shard_for_tenant(name)
    table = await request.app[BACKEND].query_all(
        "SELECT status_kind, SUM(cnt) AS n FROM tenant_counts WHERE tenant = $1 "
        "GROUP BY status_kind ORDER BY status_kind", [name])
    return render(request, "tenant.html", title=f"Tenant {name}", name=name,
                  hash=hash_tenant(name), shard=entry.shard_id,
                  process=node.owner_of.get(entry.shard_id), counts=table.to_pylist())


@routes.post("/tenant/drop-state")
async def drop_holders(request: web.Request) -> web.Response:
    _require_tenancy(request)
    name = param(request, "name", required=True, max_len=MAX_TENANT)
    backend = request.app[BACKEND]
    shard = backend.node.shard_map.shard_for_tenant(name).shard_id
    back = url("/tenant", name=name)
    try:
        n = await backend.drop_tenant_holders(shard, name)
    except BackendError as e:
        return redirect(back, ok=False, text=f"DropTenantHolders refused: {e}")
    return redirect(back, ok=True, text=f"DropTenantHolders: {n} holder(s) dropped")
