"""One job: its detail page (attempts, payload, result, limits) and its actions.

A job is named by id plus shard and/or tenant, as in the API. Without a shard the
tenant's shard is derived from the shard map (the tenant hash, no scan); with tenancy
off and no tenant, jobs may live on any shard, so the default tenant's shard is asked
first and then the others (GetJob is a point lookup on each).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from silo.cluster.shardmap import DEFAULT_TENANT
from silo.web.app import BACKEND, PageError, bad_request, param, redirect, render, url
from silo.web.backend import JOB_ACTIONS, Backend, BackendError
from silo.web.pages_cluster import shard_id_param
from silo.web.view import JOB_STATUS, TERMINAL, job_view

routes = web.RouteTableDef()

MAX_ID = 128
MAX_TENANT = 64


def _job_params(request: web.Request) -> tuple[str, str, str]:
    job_id = param(request, "id", required=True, max_len=MAX_ID)
    shard = param(request, "shard")
    if shard:
        shard = shard_id_param(shard)
    tenant = param(request, "tenant", max_len=MAX_TENANT)
    return job_id, shard, tenant


def _candidate_shards(backend: Backend, shard: str, tenant: str) -> list[str]:
    if shard:
        return [shard]
    node = backend.node
    if node.tenancy:
        if not tenant:
            raise bad_request("tenancy is on: give the job's tenant (or its shard)")
        return [node.shard_map.shard_for_tenant(tenant).shard_id]
    first = node.shard_map.shard_for_tenant(tenant or DEFAULT_TENANT).shard_id
    return [first] + [e.shard_id for e in node.shard_map.entries if e.shard_id != first]


async def find_job(backend: Backend, job_id: str, shard: str, tenant: str):
    """(shard id, GetJobResponse), or the BackendError of the first candidate shard.

    The likeliest shard is asked first; the others (tenancy off only) all at once."""
    first, *rest = _candidate_shards(backend, shard, tenant)
    try:
        return first, await backend.get_job(first, job_id, tenant or None)
    except BackendError as e:
        if not rest or not _missing(e):
            raise
        miss = e
    answers = await asyncio.gather(*(backend.get_job(sid, job_id, tenant or None)
                                     for sid in rest), return_exceptions=True)
    for sid, got in zip(rest, answers, strict=True):
        if not isinstance(got, BaseException):
            return sid, got
    for got in answers:
        if isinstance(got, BaseException) and not (isinstance(got, BackendError)
                                                    and _missing(got)):
            raise got  # a shard that could not answer: say so rather than "not found"
    raise miss


def _missing(e: BackendError) -> bool:
    return e.code.name == "NOT_FOUND" and "shard not found" not in e.message


def buttons(status: str) -> list[str]:
    """The actions that make sense for a job in `status` (the server decides anyway)."""
    if status in TERMINAL:
        return ["restart"]
    return ["cancel", "expedite"] if status == "scheduled" else ["cancel"]


@routes.get("/job")
async def job_page(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    job_id, shard, tenant = _job_params(request)
    try:
        sid, job = await find_job(backend, job_id, shard, tenant)
    except BackendError as e:
        if e.code.name == "NOT_FOUND":
            raise PageError(404, f"job {job_id} not found ({e.message})") from None
        raise
    return render(request, "job.html", title=f"Job {job_id}", job=job_view(job), shard=sid,
                  tenant=tenant, process=backend.node.owner_of.get(sid),
                  actions=buttons(JOB_STATUS.get(job.status, "")))


@routes.get("/job/delete")
async def delete_confirm(request: web.Request) -> web.Response:
    """Deleting cannot be undone: the button leads here, this form really deletes."""
    backend = request.app[BACKEND]
    job_id, shard, tenant = _job_params(request)
    sid, job = await find_job(backend, job_id, shard, tenant)
    return render(request, "job_delete.html", title=f"Delete job {job_id}",
                  job=job_view(job), shard=sid, tenant=tenant)


@routes.post("/job/{action}")
async def job_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in JOB_ACTIONS:
        raise PageError(404, f"no job action {action!r}")
    backend = request.app[BACKEND]
    job_id, shard, tenant = _job_params(request)
    if not shard:
        shard, _ = await find_job(backend, job_id, shard, tenant)
    method = JOB_ACTIONS[action][0]
    back = url("/job", id=job_id, shard=shard, tenant=tenant)
    if action == "delete" and param(request, "confirm") != "yes":
        return redirect(url("/job/delete", id=job_id, shard=shard, tenant=tenant))
    try:
        await backend.job_action(action, shard, job_id, tenant or None)
    except BackendError as e:
        return redirect(back, ok=False, text=f"{method} refused: {e}")
    if action == "delete":
        return redirect("/", ok=True, text=f"{method}: job {job_id} deleted")
    return redirect(back, ok=True, text=f"{method}: OK")
