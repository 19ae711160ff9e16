"""Tenants (only with tenancy on): find a tenant's shard, drop its concurrency holders.

Listing every tenant with its counts needs the SQL engine (the `tenant_counts` table);
until then the page finds one tenant by name: its shard comes from the tenant hash and
the shard map, so no scan is needed.
"""

from __future__ import annotations

from aiohttp import web

from silo.cluster.shardmap import hash_tenant
from silo.web.app import BACKEND, PageError, param, redirect, render, url
from silo.web.backend import BackendError

routes = web.RouteTableDef()

MAX_TENANT = 64


def _require_tenancy(request: web.Request) -> None:
    if not request.app[BACKEND].node.tenancy:
        raise PageError(404, "tenancy is off on this server: there are no tenants to show")


@routes.get("/tenants")
async def tenants_page(request: web.Request) -> web.Response:
    _require_tenancy(request)
    return render(request, "tenants.html", title="Tenants")


@routes.get("/tenant")
async def tenant_page(request: web.Request) -> web.Response:
    _require_tenancy(request)
    name = param(request, "name", required=True, max_len=MAX_TENANT)
    node = request.app[BACKEND].node
    entry = node.shard_map.shard_for_tenant(name)
    return render(request, "tenant.html", title=f"Tenant {name}", name=name,
                  hash=hash_tenant(name), shard=entry.shard_id,
                  process=node.owner_of.get(entry.shard_id))


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
