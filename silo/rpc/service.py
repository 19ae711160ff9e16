"""The silo.v1.Silo gRPC service: request validation, routing to a shard, replies.

Each handler resolves the shard (routing errors exactly as Silo's clients expect),
validates the tenant, converts the request, calls one shard operation and converts
the result. Every error leaves as the gRPC status chosen in silo.errors.
"""

from __future__ import annotations

import contextvars
import functools
import hmac
import logging
import random
import uuid
from collections.abc import Awaitable, Callable

import grpc

import silo.runtime.forward as forward
from silo import errors
from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.cluster.shardmap import DEFAULT_TENANT, hash_tenant, in_range
from silo.errors import SiloError
from silo.observability import metrics, rates, tracing
from silo.observability.rpc import instrument_rpc
from silo.rpc import convert, guard, import_jobs, ops
from silo.rpc import query as query_rpc
from silo.runtime.node import Node
from silo.shard import (
    cancel,
    delete,
    enqueue,
    expedite,
    get_job,
    lease,
    limits,
    outcome,
    restart,
)
from silo.shard.state import Shard
from silo.storage.db import StorageError
from silo.storage.records import RefreshFloatingLimit

log = logging.getLogger(__name__)

MAX_TENANT_CHARS = 64
_METHODS = pb.DESCRIPTOR.services_by_name["Silo"].methods_by_name

# (service class, method) → (the handler's inner function, its request type), for
# forwarded calls (SiloService._dispatch).
_SERVED: dict[tuple[type, str], tuple[Callable[..., Awaitable], type]] = {}

# Set while serving a call forwarded by another process: it must not be forwarded again.
_FORWARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("forwarded", default=False)


class _OwnedElsewhere(Exception):
    """The shard belongs to another worker process of this node."""

    def __init__(self, owner: int) -> None:
        self.owner = owner


def rpc(fn):
    """Serve one RPC: check the bearer token, forward to the owning process when the
    shard lives elsewhere, and turn SiloError/StorageError into gRPC statuses."""
    name = fn.__name__
    response_type = getattr(pb, _METHODS[name].output_type.name)
    request_type = getattr(pb, _METHODS[name].input_type.name)

    @functools.wraps(fn)
    async def handler(self: SiloService, request, context: grpc.aio.ServicerContext):
        try:
            forward.enter_call(context)  # refused while draining; auth/deadline go along
            if self.auth_token:
                self.check_auth(context)
            raw = None
            if isinstance(request, bytes):  # registered raw (silo.rpc.server): parse after auth
                raw, request = request, guard.parse_request(request_type, name, request)
            try:
                return await fn(self, request, context)
            except _OwnedElsewhere as e:  # the owner gets the caller's bytes as they came
                out = await self.node.peers[e.owner].call(
                    name, raw if raw is not None else request.SerializeToString())
                if raw is not None:
                    # From grpcio (raw registration): its serializer passes bytes through
                    # (silo.rpc.server.reply_serializer), so the owner's reply goes out as
                    # the owner encoded it, not parsed here and encoded again.
                    return out
                return response_type.FromString(out)  # an in-process caller (web UI)
        except SiloError as e:
            if e.trailers:
                context.set_trailing_metadata(e.trailers)
            await context.abort(e.code, guard.bounded(e.message))
        except StorageError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                guard.bounded(f"shard storage unavailable: {e}"))
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug: answer INTERNAL (not UNKNOWN), log it rate-limited
            guard.unexpected("%s raised %r", name, e, exc_info=e)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error in {name}: {type(e).__name__}")

    handler.inner = fn  # type: ignore[attr-defined]
    handler.raw_request = True  # type: ignore[attr-defined]
    return instrument_rpc(name, handler)


class SiloService(pb_grpc.SiloServicer):
    # Forwarded calls added by extensions (silo.rpc.stream): method → fn(service, payload)
    # returning the reply bytes.
    EXTRA_LOCAL: dict[str, Callable[..., Awaitable[bytes]]] = {}

    def __init__(self, node: Node, *, auth_token: str = "") -> None:
        self.node = node
        self.auth_token = auth_token

    # ---- cross-cutting ---------------------------------------------------------

    def check_auth(self, context: grpc.aio.ServicerContext) -> None:
        for k, v in context.invocation_metadata() or ():
            if k == "authorization":
                if isinstance(v, bytes) or not v.isascii():
                    raise SiloError(grpc.StatusCode.UNAUTHENTICATED,
                                    "invalid authorization header")
                if not hmac.compare_digest(v.encode(), f"Bearer {self.auth_token}".encode()):
                    raise SiloError(grpc.StatusCode.UNAUTHENTICATED, "invalid auth token")
                return
        raise SiloError(grpc.StatusCode.UNAUTHENTICATED, "missing authorization header")

    def shard(self, shard_id: str) -> Shard:
        """The open shard with this id, or the routing error a client re-routes on.

        A shard of another process of this node raises _OwnedElsewhere, which the rpc
        wrapper turns into a forwarded call."""
        s = self.node.shards.get(shard_id)
        if s is not None:
            return s
        try:
            uuid.UUID(shard_id)
        except ValueError:
            raise errors.invalid(f"invalid shard ID: {errors.clip(shard_id)}") from None
        owner = self.node.owner_of.get(shard_id)
        if owner is None:
            raise errors.shard_not_found()
        if owner == self.node.index or _FORWARDED.get():
            raise errors.shard_unavailable("shard is opening")
        raise _OwnedElsewhere(owner)

    async def dispatch(self, method: str, payload: bytes, meta: forward.Forwarded):
        """Serve a call forwarded by another process (see silo.runtime.forward).

        The owner applies every rule itself, as for a direct call: the caller's token is
        checked here, tenancy in the handler, dev mode in `_reset_local`."""
        if self.auth_token:
            self.check_auth(meta)
        if tracing.ENABLED:
            method, parent = tracing.split_method(method)
            with tracing.server_span(f"forwarded {method}", parent):
                return await self._dispatch(method, payload)
        return await self._dispatch(method, payload)

    async def _dispatch(self, method: str, payload: bytes):
        if method.startswith("ops."):  # silo.rpc.ops's per-process halves
            return 0, "", (), await ops.serve_local(self, method, payload)
        _FORWARDED.set(True)
        try:
            extra = self.EXTRA_LOCAL.get(method)
            if extra is not None:
                return 0, "", (), await extra(self, payload)
            if method.endswith("@local"):
                out = await self._LOCAL[method](self, pb.LeaseTasksRequest.FromString(payload)
                                                if method == "LeaseTasks@local" else None)
            else:
                target = _SERVED.get((type(self), method))
                if target is None:  # descriptor lookups: ~3 us, once per method
                    target = _SERVED[(type(self), method)] = (
                        getattr(type(self), method).inner,
                        getattr(pb, _METHODS[method].input_type.name))
                fn, request_type = target
                out = await fn(self, request_type.FromString(payload), None)
        except StorageError as e:
            raise SiloError(grpc.StatusCode.UNAVAILABLE, f"shard storage unavailable: {e}") from e
        except SiloError:
            raise
        except Exception as e:  # a bug: INTERNAL to the caller, one throttled log line
            guard.unexpected("forwarded %s raised %r", method, e, exc_info=e)
            raise SiloError(grpc.StatusCode.INTERNAL,
                            f"internal error in {method}: {type(e).__name__}") from e
        return 0, "", (), out.SerializeToString()

    def tenant(self, shard: Shard, request) -> str:
        """The job RPCs' tenant rules (behaviour.md §1.1)."""
        given = request.tenant if request.HasField("tenant") else ""
        return self._tenant(shard, given, worker=False)

    def worker_tenant(self, shard: Shard, request) -> str:
        given = request.tenant_id if request.HasField("tenant_id") else ""
        if not self.node.tenancy:
            return DEFAULT_TENANT  # ignored entirely when tenancy is off
        if not given:
            raise errors.invalid(
                "tenant_id is required for worker operations when tenancy is enabled")
        return self._tenant(shard, given, worker=True)

    def _tenant(self, shard: Shard, given: str, *, worker: bool) -> str:
        if not self.node.tenancy:
            if given:
                raise errors.precondition(
                    "tenant must not be provided when tenancy is disabled on the server")
            return DEFAULT_TENANT
        if not given:
            raise errors.invalid("tenant id required")
        if len(given) > MAX_TENANT_CHARS:
            raise errors.invalid("invalid tenant id")
        if not in_range(hash_tenant(given), shard.range_start, shard.range_end):
            raise errors.precondition(
                f"tenant '{given}' is not within shard {shard.id} range "
                f"[{shard.range_start}, {shard.range_end}); refresh topology and retry")
        return given

    # ---- cluster ---------------------------------------------------------------

    @rpc
    async def GetClusterInfo(self, request, context):
        node = self.node
        if context is not None:  # which worker process answered: for tests and debugging
            context.set_trailing_metadata((("x-silo-worker", str(node.index)),))
        owners = [pb.ShardOwner(shard_id=e.shard_id, grpc_addr=node.advertised_addr,
                                node_id=node.node_id, range_start=e.range_start,
                                range_end=e.range_end)
                  for e in node.shard_map.entries]
        return pb.GetClusterInfoResponse(
            num_shards=len(owners), shard_owners=owners, this_node_id=node.node_id,
            this_grpc_addr=node.advertised_addr,
            members=[pb.ClusterMember(node_id=node.node_id, grpc_addr=node.advertised_addr)])

    @rpc
    async def GetNodeInfo(self, request, context):
        """The whole node's shards, whichever process answers."""
        m = await self._node_info_local(None)
        for peer in self.node.peers.values():
            other = pb.GetNodeInfoResponse.FromString(
                await peer.call("GetNodeInfo@local", b""))
            m.owned_shards.extend(other.owned_shards)
        return m

    async def _node_info_local(self, _request) -> pb.GetNodeInfoResponse:
        node = self.node
        return pb.GetNodeInfoResponse(node_id=node.node_id, owned_shards=[
            pb.OwnedShardInfo(shard_id=s.id, total_jobs=s.total_jobs,
                              completed_jobs=s.completed_jobs, cleanup_status="CompactionDone",
                              created_at_ms=s.created_at_ms)
            for s in node.shards.values()])

    # ---- jobs --------------------------------------------------------------------

    @rpc
    async def Enqueue(self, request, context):
        s = self.shard(request.shard)
        tenant = self.tenant(s, request)
        job_id = await enqueue.enqueue(s, tenant=tenant, job_id=request.id,
                                       **convert.enqueue_fields(request))
        self.node.publish(s)
        metrics.job_enqueued(s.id, tenant)
        rates.enqueued(request.task_group)
        return pb.EnqueueResponse(id=job_id)

    @rpc
    async def GetJob(self, request, context):
        s = self.shard(request.shard)
        view = await get_job.get_job(s, self.tenant(s, request), request.id,
                                     request.include_attempts)
        return convert.job_to_pb(view)

    @rpc
    async def GetJobResult(self, request, context):
        s = self.shard(request.shard)
        r = await get_job.get_job_result(s, self.tenant(s, request), request.id)
        m = pb.GetJobResultResponse(id=request.id, status=r.status,
                                    finished_at_ms=r.finished_at_ms)
        if r.status == pb.JOB_STATUS_SUCCEEDED:
            m.success_data.msgpack = r.result or b""
        elif r.status == pb.JOB_STATUS_FAILED:
            m.failure.error_code = r.error_code
            m.failure.error_data.msgpack = r.error_data or b""
        else:
            m.cancelled.cancelled_at_ms = r.finished_at_ms
        return m

    @rpc
    async def DeleteJob(self, request, context):
        s = self.shard(request.shard)
        await delete.delete_job(s, self.tenant(s, request), request.id)
        return pb.DeleteJobResponse()

    @rpc
    async def CancelJob(self, request, context):
        s = self.shard(request.shard)
        await cancel.cancel_job(s, self.tenant(s, request), request.id)
        self.node.publish(s)
        return pb.CancelJobResponse()

    @rpc
    async def RestartJob(self, request, context):
        s = self.shard(request.shard)
        await restart.restart_job(s, self.tenant(s, request), request.id)
        self.node.publish(s)
        return pb.RestartJobResponse()

    @rpc
    async def ExpediteJob(self, request, context):
        s = self.shard(request.shard)
        await expedite.expedite_job(s, self.tenant(s, request), request.id)
        return pb.ExpediteJobResponse()

    @rpc
    async def ImportJobs(self, request, context):
        return await import_jobs.serve(self, request, _OwnedElsewhere)

    # ---- workers -------------------------------------------------------------------

    @rpc
    async def LeaseTask(self, request, context):
        s = self.shard(request.shard)
        leased = await lease.lease_task(s, self.tenant(s, request), request.id,
                                        request.worker_id)
        self.node.publish(s)
        return pb.LeaseTaskResponse(task=convert.task_to_pb(leased, s.id, s.config.lease_ms))

    @rpc
    async def LeaseTasks(self, request, context):
        """Without a shard filter: tasks from every shard of the node, fairly.

        Processes are visited in a random order weighted by how many of their shards
        have pending tasks (the shared hints), so a worker whose single connection
        landed here still drains the other processes' shards; processes with nothing
        pending cost no forwarding hop, and when only local shards have work none is paid.
        """
        if not request.task_group:
            raise errors.invalid("task_group is required")
        if request.HasField("shard"):
            return await self._lease_from([self.shard(request.shard)], request)
        out = pb.LeaseTasksResponse()
        remaining = request.max_tasks
        for owner in self._lease_order():
            if remaining <= 0:
                break
            sub = pb.LeaseTasksRequest(worker_id=request.worker_id, max_tasks=remaining,
                                       task_group=request.task_group)
            if owner == self.node.index:
                got = await self._lease_local(sub)
            elif not self.node.peer_ready(owner):
                continue  # stopped, restarting or silent: its shards wait, others serve
            else:
                try:
                    reply = await self.node.peers[owner].call(
                        "LeaseTasks@local", sub.SerializeToString())
                except SiloError:
                    continue  # that process is restarting: its shards wait, others serve
                # Parsed straight into the reply: repeated fields append on merge, so no
                # intermediate message and no copy of each task out of it.
                before = len(out.tasks)
                out.MergeFromString(reply)
                remaining -= len(out.tasks) - before
                continue
            out.tasks.extend(got.tasks)
            out.refresh_tasks.extend(got.refresh_tasks)
            remaining -= len(got.tasks)
        return out

    def _lease_order(self) -> list[int]:
        me = self.node.index
        weights = self.node.processes_with_work()
        order: list[int] = []
        while weights:
            procs = list(weights)
            pick = random.choices(procs, weights=[weights[p] for p in procs])[0]
            order.append(pick)
            del weights[pick]
        if me not in order:
            order.append(me)  # hints may lag; local shards cost nothing to ask
        return order

    async def _lease_local(self, request) -> pb.LeaseTasksResponse:
        shards = list(self.node.shards.values())
        random.shuffle(shards)
        return await self._lease_from(shards, request)

    async def _lease_from(self, shards: list[Shard], request) -> pb.LeaseTasksResponse:
        out = pb.LeaseTasksResponse()
        remaining = request.max_tasks
        for s in shards:
            if remaining <= 0:
                break
            got = await lease.lease_tasks(s, request.worker_id, remaining, request.task_group)
            metrics.POLLS.inc((s.id, request.task_group))
            if got:
                self.node.publish(s)
            lease_ms = s.config.lease_ms
            for t in got:
                if t.info is None:
                    convert.fill_refresh_task(out.refresh_tasks.add(), t.lease, s.id, lease_ms)
                else:
                    convert.fill_task(out.tasks.add(), t, s.id, lease_ms)
                    remaining -= 1
                    metrics.task_leased(s.id, t.info.task_group, t.lease.task.relative_attempt,
                                        t.info.enqueue_time_ms, t.lease.started_at_ms)
        return out

    @rpc
    async def Heartbeat(self, request, context):
        s = self.shard(request.shard)
        self.worker_tenant(s, request)
        cancelled_at = await outcome.heartbeat(s, request.worker_id, request.task_id)
        if cancelled_at is None:
            return pb.HeartbeatResponse(cancelled=False)
        return pb.HeartbeatResponse(cancelled=True, cancelled_at_ms=cancelled_at)

    @rpc
    async def ReportOutcome(self, request, context):
        s = self.shard(request.shard)
        self.worker_tenant(s, request)
        kind, o = convert.outcome_from_pb(request)
        lease = s.leases.get(request.task_id)
        await outcome.report_outcome(s, request.task_id, o)
        self.node.publish(s)
        metrics.job_completed(s.id, kind)
        rates.completed(getattr(lease.task, "task_group", "") if lease is not None else "")
        return pb.ReportOutcomeResponse()

    @rpc
    async def ReportRefreshOutcome(self, request, context):
        s = self.shard(request.shard)
        self.worker_tenant(s, request)
        kind = request.WhichOneof("outcome")
        if kind is None:
            raise errors.invalid("missing outcome")
        held = s.leases.get(request.task_id)
        if held is None or not isinstance(held.task, RefreshFloatingLimit):
            raise errors.lease_not_found()
        if kind == "success":
            limits.refresh_succeeded(s, held.task, request.success.new_max_concurrency, s.now())
        else:
            limits.refresh_failed(s, held.task, s.now())
        await s.committer.commit()
        self.node.publish(s)
        return pb.ReportRefreshOutcomeResponse()

    @rpc
    async def DropTenantHolders(self, request, context):
        s = self.shard(request.shard)
        tenant = self.tenant(s, request)
        dropped = limits.drop_tenant_holders(s, tenant, s.now())
        await s.committer.commit()
        self.node.publish(s)
        return pb.DropTenantHoldersResponse(holders_dropped=dropped)

    # ---- admin -------------------------------------------------------------------------

    @rpc
    async def ResetShards(self, request, context):
        if not self.node.dev_mode:
            raise SiloError(grpc.StatusCode.PERMISSION_DENIED,
                            "ResetShards is only available in dev mode")
        n = (await self._reset_local(None)).shards_reset
        for peer in self.node.peers.values():
            n += pb.ResetShardsResponse.FromString(
                await peer.call("ResetShards@local", b"")).shards_reset
        return pb.ResetShardsResponse(shards_reset=n)

    async def _reset_local(self, _request) -> pb.ResetShardsResponse:
        if not self.node.dev_mode:  # checked again here: a peer's word is not enough
            raise SiloError(grpc.StatusCode.PERMISSION_DENIED,
                            "ResetShards is only available in dev mode")
        for s in self.node.shards.values():
            await s.wipe()
            self.node.publish(s)
        return pb.ResetShardsResponse(shards_reset=len(self.node.shards))

    _LOCAL = {
        "LeaseTasks@local": _lease_local,
        "GetNodeInfo@local": _node_info_local,
        "ResetShards@local": _reset_local,
    }

    @rpc
    async def ForceReleaseShard(self, request, context):
        try:
            uuid.UUID(request.shard)
        except ValueError:
            raise errors.invalid(f"invalid shard ID: {errors.clip(request.shard)}") from None
        return pb.ForceReleaseShardResponse(released=True)  # single node: nothing to release

    @rpc
    async def FlushShard(self, request, context):
        return await ops.flush(self, request)

    @rpc
    async def CompactShard(self, request, context):
        return await ops.compact(self, request)

    @rpc
    async def GetShardStorageInfo(self, request, context):
        return await ops.storage_info(self, request)

    @rpc
    async def CpuProfile(self, request, context):
        return await ops.cpu_profile(self, request)

    @rpc
    async def HeapProfile(self, request, context):
        return await ops.heap_profile(self, request)

    @rpc
    async def DumpTasks(self, request, context):
        return await ops.dump_tasks(self, request)

    @rpc
    async def Query(self, request, context):
        return await query_rpc.query(self, request)

    async def QueryArrow(self, request, context):
        async for message in query_rpc.query_arrow(self, request, context):
            yield message

    QueryArrow.inner = query_rpc.query_arrow_forwarded  # type: ignore[attr-defined]
    QueryArrow.raw_request = True  # type: ignore[attr-defined]


def _unimplemented(name: str, why: str):
    async def handler(self, request, context):
        raise errors.unimplemented(name, why)

    handler.__name__ = name
    return rpc(handler)  # auth first, like every Silo RPC


_LATER = {
    "RequestSplit": "shard splits need a cluster coordinator",
    "GetSplitStatus": "shard splits need a cluster coordinator",
    "ConfigureShard": "placement rings need a cluster coordinator",
}
for _name, _why in _LATER.items():
    setattr(SiloService, _name, _unimplemented(_name, _why))
