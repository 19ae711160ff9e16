"""Operations RPCs: CpuProfile, HeapProfile, DumpTasks, GetShardStorageInfo, CompactShard,
FlushShard.

Profiles and task dumps cover the whole node: the process the client reached runs its
own part and asks every other worker process for theirs over the forwarding sockets
(methods `ops.cpu`, `ops.heap`, `ops.dump`, served by `serve_local`), then merges them
into one pprof profile (each sample labelled with its `worker`) or one text. Storage RPCs
name a shard and run in the process that owns it (the service forwards them there).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import msgspec

from silo import errors
from silo._proto import silo_pb2 as pb
from silo.errors import SiloError
from silo.observability import pprof, profiling
from silo.storage import admin

log = logging.getLogger(__name__)

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _label(service) -> str:
    return f"w{service.node.index}"


# ---- per-process halves ---------------------------------------------------------------


async def _cpu_local(service, duration: int, rate: int) -> list:
    try:
        return await profiling.cpu_samples(duration, rate)
    except profiling.ProfilerMissing as e:
        raise errors.precondition(str(e)) from None
    except RuntimeError as e:
        raise SiloError(grpc.StatusCode.FAILED_PRECONDITION, f"{_label(service)}: {e}") from None


async def serve_local(service, method: str, payload: bytes) -> bytes:
    """This process's part of a node-wide operation (called by another worker)."""
    args = _dec.decode(payload) if payload else []
    if method == "ops.cpu":
        return _enc.encode(await _cpu_local(service, *args))
    if method == "ops.heap":
        return _enc.encode(await profiling.heap_samples(*args))
    if method == "ops.dump":
        return _enc.encode(profiling.dump_tasks(_label(service)))
    raise SiloError(grpc.StatusCode.UNIMPLEMENTED, f"unknown local method {method}")


async def _everywhere(service, method: str, args: list, local,
                      timeout_s: float) -> list[tuple[str, object]]:
    """(worker label, result) of this process and every reachable peer, concurrently.
    A peer that does not answer within timeout_s (e.g. its loop is stuck) is reported
    as unavailable instead of holding the whole answer."""
    payload = _enc.encode(args)

    async def peer(index: int, client) -> tuple[str, object]:
        try:
            out = await asyncio.wait_for(client.call(method, payload), timeout_s)
            return f"w{index}", _dec.decode(out)
        except TimeoutError:
            return f"w{index}", SiloError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          f"no answer within {timeout_s:.0f} s")
        except SiloError as e:
            log.warning("%s on worker %d failed: %s", method, index, e.message)
            return f"w{index}", e

    results = await asyncio.gather(
        local(), *(peer(i, c) for i, c in sorted(service.node.peers.items())))
    return [(_label(service), results[0]), *results[1:]]


# ---- profiles -----------------------------------------------------------------------------


async def cpu_profile(service, request) -> pb.CpuProfileResponse:
    duration = profiling.clamp(request.duration_seconds, 30, 1, 300)
    rate = profiling.clamp(request.frequency, 100, 1, 1000)
    parts = await _everywhere(service, "ops.cpu", [duration, rate],
                              lambda: _cpu_local(service, duration, rate), duration + 30)
    period = 1_000_000_000 // rate
    samples, total = [], 0
    for label, part in parts:
        if isinstance(part, SiloError):
            if len(parts) == 1 or label == _label(service):
                raise part
            continue
        for frames, count in part:  # type: ignore[union-attr]
            samples.append(([tuple(f) for f in frames], [count, count * period],
                            {"worker": label}))
            total += count
    data = pprof.build(samples, [("samples", "count"), ("cpu", "nanoseconds")],
                       period_type=("cpu", "nanoseconds"), period=period,
                       duration_ns=duration * 1_000_000_000)
    return pb.CpuProfileResponse(profile_data=data, duration_seconds=duration, samples=total)


async def heap_profile(service, request) -> pb.HeapProfileResponse:
    duration = profiling.clamp(request.duration_seconds, 30, 1, 300)
    parts = await _everywhere(service, "ops.heap", [duration],
                              lambda: profiling.heap_samples(duration), duration + 30)
    samples = []
    for label, part in parts:
        if isinstance(part, SiloError):
            continue
        for frames, count, size in part:  # type: ignore[union-attr]
            samples.append(([tuple(f) for f in frames], [count, size], {"worker": label}))
    data = pprof.build(samples, [("inuse_objects", "count"), ("inuse_space", "bytes")],
                       duration_ns=duration * 1_000_000_000)
    return pb.HeapProfileResponse(profile_data=data, duration_seconds=duration)


async def dump_tasks(service, request) -> pb.DumpTasksResponse:
    async def local():
        return profiling.dump_tasks(_label(service))

    parts = await _everywhere(service, "ops.dump", [], local, 10)
    texts, count = [], 0
    for label, part in parts:
        if isinstance(part, SiloError):
            texts.append(f"=== {label}: unavailable ({part.message}) ===\n")
            continue
        text, n = part  # type: ignore[misc]
        texts.append(text)
        count += n
    return pb.DumpTasksResponse(dump="\n".join(texts), task_count=count)


# ---- storage --------------------------------------------------------------------------------


def owned_shard(service, shard_id: str):
    """The shard if it is open in this process; forwards (via the service) if another
    process owns it; NOT_FOUND `shard <id> not found on this node` otherwise."""
    try:
        return service.shard(shard_id)
    except SiloError as e:
        if e.code == grpc.StatusCode.NOT_FOUND:
            raise SiloError(grpc.StatusCode.NOT_FOUND,
                            f"shard {shard_id} not found on this node") from None
        raise


async def storage_info(service, request) -> pb.GetShardStorageInfoResponse:
    s = owned_shard(service, request.shard)
    info = await admin.storage_info(service.node.store_url, s.id)
    return pb.GetShardStorageInfoResponse(
        l0_sst_count=info.l0_sst_count, total_l0_size=info.total_l0_size,
        sorted_run_count=len(info.sorted_runs), total_sorted_run_size=info.total_sorted_run_size,
        sorted_runs=[pb.SortedRunInfo(id=r.id, sst_count=r.sst_count,
                                      estimated_size=r.estimated_size)
                     for r in info.sorted_runs])


async def compact(service, request) -> pb.CompactShardResponse:
    s = owned_shard(service, request.shard)
    await s.committer.commit()
    status = await admin.submit_full_compaction(service.node.store_url, s.id, s.db)
    return pb.CompactShardResponse(status=status)


async def flush(service, request) -> pb.FlushShardResponse:
    s = owned_shard(service, request.shard)
    await s.committer.commit()
    await s.db.flush()
    return pb.FlushShardResponse(status=f"flushed shard {s.id}")
