"""The node as a whole: cluster overview, one shard (flush, compact), configuration."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from silo.config import OPTIONS
from silo.web.app import BACKEND, CONFIG, PageError, bad_request, param, redirect, render
from silo.web.backend import Backend, BackendError
from silo.web.view import fmt_duration, fmt_ms, to_toml

routes = web.RouteTableDef()


def shard_id_param(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise bad_request(f"invalid shard id: {value!r}") from None


async def _counters(backend: Backend) -> tuple[dict[str, Any], str]:
    """Per-shard counters from GetNodeInfo, or the reason they are missing."""
    try:
        info = await backend.node_info()
    except BackendError as e:
        return {}, str(e)
    return {s.shard_id: s for s in info.owned_shards}, ""


def _shard_row(backend: Backend, owner, counters: dict[str, Any]) -> dict[str, Any]:
    c = counters.get(owner.shard_id)
    process = backend.node.owner_of.get(owner.shard_id)
    row = {
        "id": owner.shard_id,
        "range": f"[{owner.range_start or '−∞'}, {owner.range_end or '+∞'})",
        "process": "" if process is None else f"w{process}",
        "available": c is not None,
        "total": c.total_jobs if c else None,
        "completed": c.completed_jobs if c else None,
        "active": (c.total_jobs - c.completed_jobs) if c else None,
        "cleanup": c.cleanup_status if c else "",
        "created": fmt_ms(c.created_at_ms) if c else "",
    }
    return row


@routes.get("/")
@routes.get("/cluster")
async def overview(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    t0 = time.perf_counter()
    cluster = await backend.cluster_info()
    counters, unavailable = await _counters(backend)
    owners = sorted(cluster.shard_owners, key=lambda o: o.range_start)
    rows = [_shard_row(backend, o, counters) for o in owners]
    known = [r for r in rows if r["available"]]
    processes = sorted({r["process"] for r in rows if r["process"]})
    tiles = [
        ("shards", len(rows)),
        ("worker processes", len(processes)),
        ("members", len(cluster.members)),
        ("jobs", sum(r["total"] for r in known)),
        ("active jobs", sum(r["active"] for r in known)),
        ("completed jobs", sum(r["completed"] for r in known)),
    ]
    return render(request, "cluster.html", title="Cluster", refresh=5, tiles=tiles, rows=rows,
                  cluster=cluster, unavailable=unavailable,
                  missing=[r["id"] for r in rows if not r["available"]],
                  took_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")


@routes.get("/shard")
async def shard_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    sid = shard_id_param(param(request, "id", required=True))
    cluster = await backend.cluster_info()
    owner = next((o for o in cluster.shard_owners if o.shard_id == sid), None)
    if owner is None:
        raise PageError(404, f"no shard {sid} in this cluster")
    counters, unavailable = await _counters(backend)
    row = _shard_row(backend, owner, counters)
    c = counters.get(sid)
    age = fmt_duration(int(time.time() * 1000) - c.created_at_ms) if c and c.created_at_ms else ""
    return render(request, "shard.html", title=f"Shard {sid[:8]}", shard=row, owner=owner,
                  age=age, unavailable=unavailable)


async def _shard_action(request: web.Request, what: str) -> web.Response:
    backend = request.app[BACKEND]
    sid = shard_id_param(request.match_info["id"])
    back = f"/shard?id={sid}"
    try:
        if what == "flush":
            out = await backend.flush_shard(sid)
            text = f"FlushShard: {out.status or 'OK'}"
        else:
            out = await backend.compact_shard(sid)
            text = f"CompactShard: {getattr(out, 'status', '') or 'OK'}"
    except BackendError as e:
        return redirect(back, ok=False, text=f"{'FlushShard' if what == 'flush' else 'CompactShard'}"
                        f" refused: {e}")
    return redirect(back, ok=True, text=text)


@routes.post("/shard/{id}/flush")
async def shard_flush(request: web.Request) -> web.Response:
    return await _shard_action(request, "flush")


@routes.post("/shard/{id}/compact")
async def shard_compact(request: web.Request) -> web.Response:
    return await _shard_action(request, "compact")


@routes.get("/config")
async def config_page(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    text = to_toml(config.redacted(), {o.name: o.toml for o in OPTIONS})
    return render(request, "config.html", title="Configuration", toml=text)
