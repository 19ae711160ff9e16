"""Operator ``silo`` subcommands: heap-profile, dump-tasks, node info, shard info|compact|flush.

(`silo profile`, the CPU profile, lives in silo.cli_client.) They share the client
commands' flags (``--server``, ``--token``, ``--json`` …) and exit codes. A profile is
written as a gzipped pprof file: ``go tool pprof -http=: heap.pprof`` or speedscope.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from silo import cli_client as cc


def configure_heap_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=int, default=10, metavar="S",
                        help="seconds of allocations to record (default %(default)s)")
    parser.add_argument("--out", "-o", default="heap.pprof", help="output file (pprof)")
    cc._common(parser)


def run_heap_profile(args: argparse.Namespace) -> int:
    from silo._proto import silo_pb2 as pb

    async def body(client) -> int:
        r = await client._unrouted("HeapProfile", pb.HeapProfileRequest(
            duration_seconds=args.duration), timeout=args.duration + args.timeout)
        with open(args.out, "wb") as f:
            f.write(r.profile_data)
        if args.json:
            cc._emit_json({"out": args.out, "bytes": len(r.profile_data),
                           "duration_seconds": r.duration_seconds})
        else:
            print(f"wrote {len(r.profile_data)} bytes (allocations over "
                  f"{r.duration_seconds} s) to {args.out}")
        return 0

    return cc._run(args, body)


def configure_dump_tasks(parser: argparse.ArgumentParser) -> None:
    cc._common(parser)


def run_dump_tasks(args: argparse.Namespace) -> int:
    from silo._proto import silo_pb2 as pb

    async def body(client) -> int:
        r = await client._unrouted("DumpTasks", pb.DumpTasksRequest())
        if args.json:
            cc._emit_json({"task_count": r.task_count, "dump": r.dump})
        else:
            print(r.dump)
        return 0

    return cc._run(args, body)


def configure_node(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    cc._common(sub.add_parser("info", help="this node's id and the shards it has open"))


def run_node(args: argparse.Namespace) -> int:
    from silo._proto import silo_pb2 as pb

    async def body(client) -> int:
        r = await client._unrouted("GetNodeInfo", pb.GetNodeInfoRequest())
        shards = sorted(r.owned_shards, key=lambda s: s.shard_id)
        if args.json:
            cc._emit_json({"node_id": r.node_id, "placement_rings": list(r.placement_rings),
                           "shards": [{"shard_id": s.shard_id, "total_jobs": s.total_jobs,
                                       "completed_jobs": s.completed_jobs,
                                       "cleanup_status": s.cleanup_status,
                                       "created_at_ms": s.created_at_ms} for s in shards]})
            return 0
        print(f"node {r.node_id}: {len(shards)} shards")
        print(cc._table(["shard", "total jobs", "completed", "cleanup"],
                        [[s.shard_id, s.total_jobs, s.completed_jobs, s.cleanup_status]
                         for s in shards]))
        return 0

    return cc._run(args, body)


def configure_shard(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("info", "the shard's LSM tree: L0 SSTs, sorted runs, sizes"),
                              ("compact", "submit a full compaction of the shard"),
                              ("flush", "flush the shard's writes to the object store")):
        p = sub.add_parser(action, help=help_text)
        p.add_argument("shard", metavar="ID", help="shard id (see `silo cluster info`)")
        cc._common(p)


def run_shard(args: argparse.Namespace) -> int:
    from silo._proto import silo_pb2 as pb

    async def body(client) -> int:
        if args.action == "info":
            r = await client._unrouted("GetShardStorageInfo",
                                       pb.GetShardStorageInfoRequest(shard=args.shard))
            runs = [{"id": x.id, "sst_count": x.sst_count, "estimated_size": x.estimated_size}
                    for x in r.sorted_runs]
            if args.json:
                cc._emit_json({"shard": args.shard, "l0_sst_count": r.l0_sst_count,
                               "total_l0_size": r.total_l0_size,
                               "sorted_run_count": r.sorted_run_count,
                               "total_sorted_run_size": r.total_sorted_run_size,
                               "sorted_runs": runs})
                return 0
            print(cc._kv([("shard", args.shard), ("L0 SSTs", r.l0_sst_count),
                          ("L0 bytes", r.total_l0_size), ("sorted runs", r.sorted_run_count),
                          ("sorted run bytes", r.total_sorted_run_size)]))
            if runs:
                print(cc._table(["run", "SSTs", "estimated bytes"],
                                [[x["id"], x["sst_count"], x["estimated_size"]] for x in runs]))
            return 0
        method, req = {"compact": ("CompactShard", pb.CompactShardRequest),
                       "flush": ("FlushShard", pb.FlushShardRequest)}[args.action]
        r = await client._unrouted(method, req(shard=args.shard))
        if args.json:
            cc._emit_json({"shard": args.shard, "status": r.status})
        else:
            print(r.status)
        return 0

    return cc._run(args, body)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "heap-profile": ("capture a heap (allocation) profile of a server", configure_heap_profile,
                     run_heap_profile),
    "dump-tasks": ("print every asyncio task and thread stack of a server",
                   configure_dump_tasks, run_dump_tasks),
    "node": ("node info: the shards this node has open", configure_node, run_node),
    "shard": ("shard storage: info, compact or flush", configure_shard, run_shard),
}
