"""The silostream.v1.SiloStream service: EnqueueMany and the push-based worker stream.

An extension beside silo.v1.Silo, for clients that want fewer RPCs per job. Every item
goes through the very handler its unary twin uses (SiloService's Enqueue,
ReportOutcome, Heartbeat, ReportRefreshOutcome), so validation, tenant rules, routing
and error codes are the unary API's; an item for a shard of another worker process is
forwarded to it exactly like the unary call would be. The worker stream itself lives in
silo.rpc.work_session; the calls its relays make to other processes are registered
here as forwarded `…@local` methods.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import grpc
import msgspec

from silo import errors
from silo._proto import silo_pb2 as pb
from silo._proto import silo_stream_pb2 as spb
from silo._proto import silo_stream_pb2_grpc as spb_grpc
from silo.errors import SiloError
from silo.rpc import batch, guard
from silo.rpc.service import _FORWARDED, _METHODS, SiloService, _OwnedElsewhere
from silo.runtime import forward
from silo.shard import give_back
from silo.shard.ready import wait_due
from silo.storage.db import StorageError

log = logging.getLogger(__name__)

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["SiloStream"].full_name

_wait_args = msgspec.msgpack.Decoder(tuple[str, str, int])
_give_back_args = msgspec.msgpack.Decoder(tuple[str, str, str])
_cancel_args = msgspec.msgpack.Decoder(list[tuple[str, str, str, str]])
_cancel_reply = msgspec.msgpack.Decoder(list[str])
_encoder = msgspec.msgpack.Encoder()
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_of(e: BaseException) -> spb.Status:
    """The gRPC status the unary call would have ended with."""
    if isinstance(e, SiloError):
        return spb.Status(code=e.code.value[0], message=e.message)
    if isinstance(e, StorageError):
        return spb.Status(code=grpc.StatusCode.UNAVAILABLE.value[0],
                          message=f"shard storage unavailable: {e}")
    log.exception("stream item failed", exc_info=e)
    return spb.Status(code=grpc.StatusCode.INTERNAL.value[0], message=str(e))


async def call_unary(svc: SiloService, name: str, request):
    """Run a silo.v1 handler for one item, here or in the shard's owner process."""
    fn = getattr(type(svc), name).inner
    try:
        return await fn(svc, request, None)
    except _OwnedElsewhere as e:
        out = await svc.node.peers[e.owner].call(name, request.SerializeToString())
        return getattr(pb, _METHODS[name].output_type.name).FromString(out)


# ---- calls a worker stream makes to the process owning a shard ---------------------------


async def _stream_wait_local(svc: SiloService, payload: bytes) -> bytes:
    """Wait until one of this process's shards (or the named one) has a due task."""
    task_group, shard_id, timeout_ms = _wait_args.decode(payload)
    if shard_id:
        s = svc.node.shards.get(shard_id)
        if s is None:
            raise errors.shard_unavailable("shard is opening")
        shards = [s]
    else:
        shards = list(svc.node.shards.values())
    due = await wait_due(shards, task_group, timeout_ms / 1000, relayed=True)
    return b"\x01" if due else b"\x00"


async def _give_back_local(svc: SiloService, payload: bytes) -> bytes:
    shard_id, worker_id, task_id = _give_back_args.decode(payload)
    s = svc.node.shards.get(shard_id)
    if s is None:
        raise errors.shard_unavailable("shard is opening")
    await give_back.give_back(s, worker_id, task_id)
    svc.node.publish(s)
    return b""


def cancelled_here(svc: SiloService, tasks: list[tuple[str, str, str, str]]) -> list[str]:
    """Of (shard, tenant, job id, task id) on this process's shards: the task ids whose
    job has a cancel request."""
    out = []
    for shard_id, tenant, job_id, task_id in tasks:
        s = svc.node.shards.get(shard_id)
        job = s.active.get((tenant, job_id)) if s is not None else None
        if job is not None and job.cancelled_at_ms is not None:
            out.append(task_id)
    return out


async def _cancelled_local(svc: SiloService, payload: bytes) -> bytes:
    return _encoder.encode(cancelled_here(svc, _cancel_args.decode(payload)))


SiloService.EXTRA_LOCAL.update({
    "StreamWait@local": _stream_wait_local,
    "StreamGiveBack@local": _give_back_local,
    "StreamCancelled@local": _cancelled_local,
})


async def cancelled_at(svc: SiloService, owner: int, tasks: list[tuple[str, str, str, str]]
                       ) -> list[str]:
    out = await svc.node.peers[owner].call("StreamCancelled@local", _encoder.encode(tasks))
    return _cancel_reply.decode(out)


async def stream_wait(svc: SiloService, owner: int, task_group: str, shard_id: str,
                      timeout_ms: int) -> bool:
    out = await svc.node.peers[owner].call(
        "StreamWait@local", _encoder.encode((task_group, shard_id, timeout_ms)))
    return out == b"\x01"


async def give_back_task(svc: SiloService, worker_id: str, shard_id: str, task_id: str) -> None:
    """Give back one unstarted task, wherever its shard lives."""
    s = svc.node.shards.get(shard_id)
    if s is not None:
        await give_back.give_back(s, worker_id, task_id)
        svc.node.publish(s)
        return
    try:
        svc.shard(shard_id)
    except _OwnedElsewhere as e:
        await svc.node.peers[e.owner].call(
            "StreamGiveBack@local", _encoder.encode((shard_id, worker_id, task_id)))


# ---- many items of one method for another process: one forwarded call ------------------

# Methods a worker stream relays in batches (their handlers are the unary ones).
BATCHED = frozenset({"ReportOutcome", "Heartbeat", "ReportRefreshOutcome"})
_many_args = msgspec.msgpack.Decoder(tuple[str, list[bytes]])
_many_reply = msgspec.msgpack.Decoder(list[tuple[int, str, bytes]])


async def call_unary_many(svc: SiloService, owner: int, name: str, requests: list
                          ) -> list[object]:
    """Run the silo.v1 handler `name` for each request in process `owner`, in one
    forwarded call: per request its reply, or the SiloError the unary call would have
    ended with. A failed relay raises (every request of it failed with that error)."""
    out = _many_reply.decode(await svc.node.peers[owner].call(
        "UnaryMany@local", _encoder.encode((name, [r.SerializeToString() for r in requests]))))
    if len(out) != len(requests):
        raise SiloError(grpc.StatusCode.INTERNAL, f"forwarded {name} batch: wrong count")
    reply_type = getattr(pb, _METHODS[name].output_type.name)
    return [reply_type.FromString(body) if code == 0
            else SiloError(_CODES.get(code, grpc.StatusCode.UNKNOWN), message)
            for code, message, body in out]


def _code_message(e: BaseException) -> tuple[int, str]:
    st = status_of(e)
    return st.code, st.message


async def report_outcomes_here(svc: SiloService, requests: list) -> list[object]:
    """ReportOutcome for requests of this process's shards: per request None once
    durable, or the exception the unary call would have ended with."""
    fn = SiloService.ReportOutcome.inner  # type: ignore[attr-defined]
    return await batch.report_outcomes(svc, requests, lambda r: fn(svc, r, None))


async def _unary_many_local(svc: SiloService, payload: bytes) -> bytes:
    name, bodies = _many_args.decode(payload)
    if name not in BATCHED:
        raise errors.invalid(f"method {errors.clip(name)} is not relayed in batches")
    fn = getattr(type(svc), name).inner
    request_type = getattr(pb, _METHODS[name].input_type.name)
    if name == "ReportOutcome":  # one pass (silo.rpc.batch); its reply has no fields
        got = await report_outcomes_here(svc, [request_type.FromString(b) for b in bodies])
        return _encoder.encode([(0, "", b"") if r is None else (*_code_message(r), b"")
                                for r in got])

    async def one(body: bytes) -> tuple[int, str, bytes]:
        try:
            return 0, "", (await fn(svc, request_type.FromString(body), None)).SerializeToString()
        except Exception as e:  # noqa: BLE001 - answered per item, as the unary call would
            st = status_of(e)
            return st.code, st.message, b""

    return _encoder.encode(await asyncio.gather(*(one(b) for b in bodies)))


SiloService.EXTRA_LOCAL["UnaryMany@local"] = _unary_many_local


# ---- EnqueueMany: one forwarded call per owner process, not one per job -------------------


def owner_elsewhere(svc: SiloService, shard_id: str) -> int | None:
    """The worker process owning shard_id if it is another one; None when the shard is
    here, unknown or invalid (the local handler then answers exactly as the unary call).

    A shard here or named in the map is answered from the node's dicts (what
    `svc.shard` would decide, without its UUID parse and raised _OwnedElsewhere: this
    runs once per job and outcome, and half of them belong to the other process)."""
    node = svc.node
    if shard_id in node.shards:
        return None
    owner = node.owner_of.get(shard_id)
    if owner is not None and owner != node.index and not _FORWARDED.get():
        return owner
    try:
        svc.shard(shard_id)
    except _OwnedElsewhere as e:
        return e.owner
    except SiloError:
        return None
    return None


async def _enqueue_one(svc: SiloService, job: pb.EnqueueRequest) -> pb.EnqueueResponse:
    return await call_unary(svc, "Enqueue", job)


def _set_result(r: spb.EnqueueResult, got: object) -> None:
    if isinstance(got, BaseException):
        st = status_of(got)
        r.error.code = st.code
        r.error.message = st.message
    else:
        r.id = got  # type: ignore[assignment]


def owner_lookup(svc: SiloService) -> Callable[[str], int | None]:
    """owner_elsewhere remembered per shard for one batch (a batch names few shards)."""
    seen: dict[str, int | None] = {}

    def lookup(shard_id: str) -> int | None:
        if shard_id in seen:
            return seen[shard_id]
        owner = seen[shard_id] = owner_elsewhere(svc, shard_id)
        return owner

    return lookup


async def enqueue_many(svc: SiloService, jobs: list[pb.EnqueueRequest]
                       ) -> spb.EnqueueManyResponse:
    """The jobs of this process's shards in one pass (silo.rpc.batch: each checked as
    the unary Enqueue checks it, staged, then one wait for the commits); the jobs of
    shards another process owns go to it as one forwarded EnqueueMany per process
    (measured: a forwarded call costs both processes more than the enqueue itself), so
    a batch costs one relay per process, not one per job. Each result is sent only
    once its own job is durable, as before."""
    remote: dict[int, list[int]] = {}
    local: list[int] = []
    owner_of = owner_lookup(svc)
    for i, job in enumerate(jobs):
        owner = owner_of(job.shard)
        if owner is None:
            local.append(i)
        else:
            remote.setdefault(owner, []).append(i)
    resp = spb.EnqueueManyResponse()
    results = [resp.results.add() for _ in jobs]

    async def here() -> None:
        if not local:
            return
        got = await batch.enqueue_jobs(svc, [jobs[i] for i in local],
                                       functools.partial(_enqueue_one, svc))
        for i, g in zip(local, got, strict=True):
            _set_result(results[i], g)

    async def there(owner: int, idx: list[int]) -> None:
        req = spb.EnqueueManyRequest(jobs=[jobs[i] for i in idx])
        try:
            out = spb.EnqueueManyResponse.FromString(await svc.node.peers[owner].call(
                "EnqueueMany@local", req.SerializeToString()))
            if len(out.results) != len(idx):
                raise SiloError(grpc.StatusCode.INTERNAL,
                                "forwarded EnqueueMany answered a different count")
            for i, r in zip(idx, out.results, strict=True):
                results[i].CopyFrom(r)
        except Exception as e:  # noqa: BLE001 - the relay failed: every job of it did
            for i in idx:
                _set_result(results[i], e)

    if not remote:
        await here()
    else:
        await asyncio.gather(here(), *(there(o, idx) for o, idx in remote.items()))
    return resp


async def _enqueue_many_local(svc: SiloService, payload: bytes) -> bytes:
    """The owner's half of a forwarded EnqueueMany: every job is for a shard here (a
    shard that moved meanwhile answers `shard_unavailable`, as a forwarded Enqueue)."""
    jobs = list(spb.EnqueueManyRequest.FromString(payload).jobs)
    resp = spb.EnqueueManyResponse()
    got = await batch.enqueue_jobs(svc, jobs, functools.partial(_enqueue_one, svc))
    for g in got:
        _set_result(resp.results.add(), g)
    return resp.SerializeToString()


SiloService.EXTRA_LOCAL["EnqueueMany@local"] = _enqueue_many_local


# ---- the service ---------------------------------------------------------------------------


class SiloStreamService(spb_grpc.SiloStreamServicer):
    def __init__(self, svc: SiloService) -> None:
        self.svc = svc

    async def _auth(self, context: grpc.aio.ServicerContext) -> None:
        try:
            forward.enter_call(context)  # the token and deadline go with forwarded calls
            if self.svc.auth_token:
                self.svc.check_auth(context)
        except SiloError as e:
            await context.abort(e.code, guard.bounded(e.message))

    async def EnqueueMany(self, request: bytes, context):
        await self._auth(context)
        try:
            parsed = guard.parse_request(spb.EnqueueManyRequest, "EnqueueMany", request)
        except SiloError as e:
            await context.abort(e.code, e.message)
        return await enqueue_many(self.svc, list(parsed.jobs))

    async def Work(self, request_iterator, context):
        from silo.rpc.work_session import WorkSession  # noqa: PLC0415 - it builds on this module

        await self._auth(context)
        await WorkSession(self.svc, context).run()


def add_stream_service(service: SiloStreamService, server: grpc.aio.Server) -> None:
    """Register silostream.v1.SiloStream with raw-bytes request deserializers, as the
    Silo service is (silo.rpc.server): a body that does not parse then reaches our code
    and ends INVALID_ARGUMENT, instead of failing inside grpcio, which answered UNKNOWN
    and logged a traceback per call. EnqueueMany parses after the auth check; the Work
    session parses each WorkerUp it reads (WorkSession.read)."""
    handlers = {
        "EnqueueMany": grpc.unary_unary_rpc_method_handler(
            service.EnqueueMany, request_deserializer=None,
            response_serializer=spb.EnqueueManyResponse.SerializeToString),
        "Work": grpc.stream_stream_rpc_method_handler(
            service.Work, request_deserializer=None,
            response_serializer=spb.WorkerDown.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
