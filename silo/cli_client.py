"""Client-side ``silo`` subcommands: worker, cluster, job, tenant, enqueue, query, profile.

Every command takes ``--server HOST:PORT`` (default ``$SILO_SERVER`` or 127.0.0.1:7450),
``--token``, ``--tls`` and ``--json`` (one JSON document on stdout, for scripts; readable
tables otherwise, where epoch-millisecond times also show as UTC dates). Jobs are
addressed by id and ``--tenant``; the CLI routes to the right shard itself. Exit codes:
0 success, 1 error (one line on stderr: ``silo: error: CODE: message``; with ``--json``
the document ``{"error": {"code": ..., "message": ..., "exit_code": ...}}`` on stdout
instead), 2 usage error, 3 the job has not finished (``job result`` without ``--wait``,
or ``--wait`` timed out), 4 ``job result`` of a job that failed, 5 of one cancelled.

Heavy imports (grpc, the client) happen inside the handlers so ``silo serve`` does not
pay for them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import enum
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

DEFAULT_SERVER = "127.0.0.1:7450"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FINISHED = 3
EXIT_JOB_FAILED = 4
EXIT_JOB_CANCELLED = 5

# Set from the parsed --json flag: errors then leave as one JSON document on stdout.
json_errors = False
# Epoch milliseconds from 2001 on read as times (smaller *_ms values are durations).
_EPOCH_MS_FROM = 978_307_200_000


# ---- shared plumbing -------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, server: bool = True) -> None:
    if server:
        parser.add_argument("--server", metavar="HOST:PORT",
                            default=os.environ.get("SILO_SERVER") or DEFAULT_SERVER,
                            help="seed server address; comma-separated for several "
                                 "(env SILO_SERVER; default %(default)s)")
        parser.add_argument("--token", default=os.environ.get("SILO_TOKEN") or None,
                            help="bearer token (env SILO_TOKEN)")
        parser.add_argument("--tls", action="store_true", help="connect with TLS")
        parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                            help="deadline of each RPC in seconds (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return getattr(v, "label", v.name)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(doc), ensure_ascii=False) + "\n")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out)


def _kv(pairs: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {_show_field(k, v)}" for k, v in pairs)


def _when(ms: Any) -> str:
    """Epoch ms as ``1764579907123 (2025-12-01 09:05:07.123 UTC)``; other values as is."""
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < _EPOCH_MS_FROM:
        return _show(ms)
    try:
        t = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return f"{ms} ({t:%Y-%m-%d %H:%M:%S}.{ms % 1000:03d} UTC)"


def _show_field(key: str, v: Any) -> str:
    return _when(v) if key.endswith("_ms") else _show(v)


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, enum.Enum):
        return getattr(v, "label", v.name)
    if isinstance(v, str):
        return v
    return json.dumps(_jsonable(v), ensure_ascii=False)


# Error codes of the CLI itself (JSON only); gRPC status names also prefix the text line.
_CLI_STATUSES = frozenset({"USAGE", "UNREACHABLE", "NOT_FINISHED", "TIMEOUT"})


def _fail(message: str, code: int = EXIT_ERROR, status: str | None = None) -> int:
    """Report an error (one line on stderr, or one JSON document with --json)."""
    if json_errors:
        _emit_json({"error": {"code": status, "message": message, "exit_code": code}})
    else:
        prefix = f"{status}: " if status and status not in _CLI_STATUSES else ""
        print(f"silo: error: {prefix}{message}", file=sys.stderr)
    return code


def _client(args: argparse.Namespace):
    from silo.client import SiloClient

    return SiloClient(args.server, token=args.token, tls=args.tls, rpc_timeout_s=args.timeout,
                      topology_refresh_interval_s=0, max_retries=4)


def _run(args: argparse.Namespace, body: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    """Run ``body(client)`` on a fresh client; turn client errors into one-line messages."""
    from silo.client import JobNotTerminal, SiloError, TopologyError

    async def main() -> int:
        async with _client(args) as client:
            return await body(client)

    try:
        return asyncio.run(main())
    except JobNotTerminal as e:
        return _fail(str(e), EXIT_NOT_FINISHED, "NOT_FINISHED")
    except TimeoutError as e:
        return _fail(str(e) or "timed out", EXIT_NOT_FINISHED, "TIMEOUT")
    except TopologyError as e:
        return _fail(f"cannot reach the cluster at {args.server}: {e}", status="UNREACHABLE")
    except SiloError as e:
        return _fail(e.message, status=e.code_name)
    except KeyboardInterrupt:
        return 130


# ---- cluster ---------------------------------------------------------------------------


def configure_cluster(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _common(sub.add_parser("info", help="shards, their hash ranges and owners"))


def run_cluster(args: argparse.Namespace) -> int:
    async def body(client) -> int:
        info = await client.get_cluster_info()
        shards = sorted(info.shard_owners, key=lambda o: o.range_start)
        doc = {
            "num_shards": info.num_shards,
            "this_node_id": info.this_node_id,
            "this_grpc_addr": info.this_grpc_addr,
            "shards": [{"shard_id": o.shard_id, "grpc_addr": o.grpc_addr, "node_id": o.node_id,
                        "range_start": o.range_start, "range_end": o.range_end}
                       for o in shards],
            "members": [{"node_id": m.node_id, "grpc_addr": m.grpc_addr,
                         "placement_rings": list(m.placement_rings)} for m in info.members],
        }
        if args.json:
            _emit_json(doc)
            return 0
        print(f"{info.num_shards} shards, {len(info.members)} member(s); answered by "
              f"{info.this_node_id} at {info.this_grpc_addr}\n")
        print(_table(["SHARD", "RANGE START", "RANGE END", "OWNER", "NODE"],
                     [[s["shard_id"], s["range_start"] or "(-inf)", s["range_end"] or "(+inf)",
                       s["grpc_addr"] or "(unowned)", s["node_id"]] for s in doc["shards"]]))
        return 0

    return _run(args, body)


# ---- job -------------------------------------------------------------------------------

_JOB_ACTIONS = {
    "cancel": ("cancel_job", "cancelled"),
    "restart": ("restart_job", "restarted"),
    "expedite": ("expedite_job", "expedited"),
    "delete": ("delete_job", "deleted"),
}


def configure_job(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    helps = {"get": "show a job", "result": "show a finished job's outcome",
             "cancel": "cancel a job", "restart": "run a failed or cancelled job again",
             "expedite": "run a future-scheduled job now",
             "delete": "delete a finished job (no error if missing)"}
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("id", help="job id")
        p.add_argument("--tenant", default=None, help="the job's tenant (with tenancy on)")
        if name == "get":
            p.add_argument("--attempts", action="store_true", help="include the attempts")
        if name == "result":
            p.add_argument("--wait", action="store_true", help="wait until the job finishes")
            p.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                           help="give up waiting after S seconds (exit 3)")
            p.add_argument("--poll-interval", type=float, default=0.5, metavar="S")
        _common(p)


def _job_doc(job) -> dict[str, Any]:
    return _jsonable(job)


def run_job(args: argparse.Namespace) -> int:
    action = args.action

    async def body(client) -> int:
        if action == "get":
            job = await client.get_job(args.id, args.tenant, include_attempts=args.attempts)
            doc = _job_doc(job)
            if args.json:
                _emit_json(doc)
                return 0
            print(_kv([(k, v) for k, v in doc.items() if k != "attempts"]))
            if job.attempts:
                print()
                print(_table(["#", "TASK", "STATUS", "STARTED", "FINISHED", "ERROR"],
                             [[a.attempt_number, a.task_id, _show(a.status),
                               _when(a.started_at_ms), _when(a.finished_at_ms),
                               a.error_code] for a in job.attempts]))
            return 0
        if action == "result":
            h = client.handle(args.id, args.tenant)
            if args.wait:
                r = await h.await_result(timeout=args.wait_timeout,
                                         poll_interval=args.poll_interval)
            else:
                r = await client.get_job_result(args.id, args.tenant)
            doc = _jsonable(r)
            if args.json:
                _emit_json(doc)
            else:
                print(_kv(list(doc.items())))
            # A script can tell the outcome from the exit code alone.
            if r.failed:
                return EXIT_JOB_FAILED
            if r.cancelled:
                return EXIT_JOB_CANCELLED
            return 0
        method, done = _JOB_ACTIONS[action]
        await getattr(client, method)(args.id, args.tenant)
        if args.json:
            _emit_json({"id": args.id, "tenant": args.tenant, "action": action, "ok": True})
        else:
            print(f"{done} job {args.id}")
        return 0

    return _run(args, body)


# ---- tenant ----------------------------------------------------------------------------


def configure_tenant(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("hash", help="the tenant's XXH64 position in hash space (offline)")
    p.add_argument("tenant")
    _common(p, server=False)
    p = sub.add_parser("locate", help="the shard and server that serve a tenant")
    p.add_argument("tenant")
    _common(p)


def run_tenant(args: argparse.Namespace) -> int:
    from silo.client.routing import hash_tenant

    h = hash_tenant(args.tenant)
    if args.action == "hash":
        if args.json:
            _emit_json({"tenant": args.tenant, "hash": h})
        else:
            print(h)
        return 0

    async def body(client) -> int:
        s = await client.shard_for_tenant(args.tenant)
        doc = {"tenant": args.tenant, "hash": h, "shard_id": s.shard_id,
               "grpc_addr": s.grpc_addr, "range_start": s.range_start,
               "range_end": s.range_end}
        if args.json:
            _emit_json(doc)
        else:
            print(_kv(list(doc.items())))
        return 0

    return _run(args, body)


# ---- enqueue ---------------------------------------------------------------------------


def configure_enqueue(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-group", "-g", required=True, help="task group workers poll")
    parser.add_argument("--payload", "-p", default="null",
                        help="payload as JSON (default null); @FILE reads a file, - stdin")
    parser.add_argument("--tenant", default=None)
    parser.add_argument("--id", default=None, help="job id (default: server-generated)")
    parser.add_argument("--priority", type=int, default=50, help="0 (first) .. 99")
    parser.add_argument("--start-at-ms", type=int, default=None,
                        help="earliest start, Unix ms (default now)")
    parser.add_argument("--delay", type=float, default=None, metavar="S",
                        help="start S seconds from now")
    parser.add_argument("--metadata", "-m", action="append", default=[], metavar="K=V")
    parser.add_argument("--retries", type=int, default=None, metavar="N",
                        help="retry policy: N retries (1 s back-off doubling to 60 s)")
    parser.add_argument("--concurrency-key", default=None, metavar="KEY",
                        help="add a concurrency limit on KEY (with --max-concurrency)")
    parser.add_argument("--max-concurrency", type=int, default=1, metavar="N")
    _common(parser)


def _read_payload(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    return json.loads(text)


def run_enqueue(args: argparse.Namespace) -> int:
    import time

    from silo.client import ConcurrencyLimit, RetryPolicy

    try:
        payload = _read_payload(args.payload)
    except (OSError, ValueError) as e:
        return _fail(f"bad --payload: {e}", EXIT_USAGE, "USAGE")
    metadata = {}
    for item in args.metadata:
        k, sep, v = item.partition("=")
        if not sep:
            return _fail(f"bad --metadata {item!r}: expected K=V", EXIT_USAGE, "USAGE")
        metadata[k] = v
    start_at_ms = args.start_at_ms
    if start_at_ms is None and args.delay is not None:
        start_at_ms = int((time.time() + args.delay) * 1000)

    async def body(client) -> int:
        h = await client.enqueue(
            payload, args.task_group, id=args.id, priority=args.priority,
            start_at_ms=start_at_ms, tenant=args.tenant, metadata=metadata or None,
            retry_policy=RetryPolicy(args.retries) if args.retries is not None else None,
            limits=[ConcurrencyLimit(args.concurrency_key, args.max_concurrency)]
            if args.concurrency_key else None)
        if args.json:
            _emit_json({"id": h.id, "tenant": h.tenant, "task_group": args.task_group})
        else:
            print(h.id)
        return 0

    return _run(args, body)


# ---- profile -------------------------------------------------------------------


def configure_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=int, default=10, metavar="S",
                        help="seconds to sample (default %(default)s)")
    parser.add_argument("--frequency", type=int, default=0, help="samples per second")
    parser.add_argument("--out", "-o", default="cpu.pprof", help="output file (pprof)")
    _common(parser)


def run_profile(args: argparse.Namespace) -> int:
    from silo._proto import silo_pb2 as pb

    async def body(client) -> int:
        r = await client._unrouted("CpuProfile", pb.CpuProfileRequest(
            duration_seconds=args.duration, frequency=args.frequency),
            timeout=args.duration + args.timeout)
        with open(args.out, "wb") as f:
            f.write(r.profile_data)
        doc = {"out": args.out, "bytes": len(r.profile_data),
               "duration_seconds": r.duration_seconds, "samples": r.samples}
        if args.json:
            _emit_json(doc)
        else:
            print(f"wrote {len(r.profile_data)} bytes ({r.samples} samples over "
                  f"{r.duration_seconds} s) to {args.out}")
        return 0

    return _run(args, body)


# ---- worker ----------------------------------------------------------------------------


def configure_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("handler", metavar="MODULE:FUNCTION",
                        help="the task handler, e.g. myapp.jobs:send_email")
    parser.add_argument("--task-group", "-g", required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--pollers", type=int, default=1)
    parser.add_argument("--tasks-per-poll", type=int, default=None)
    parser.add_argument("--poll-interval", type=float, default=1.0, metavar="S")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0, metavar="S")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--refresh-handler", default=None, metavar="MODULE:FUNCTION",
                        help="handler for floating concurrency limit refresh tasks")
    parser.add_argument("--stop-timeout", type=float, default=30.0, metavar="S",
                        help="on SIGINT/SIGTERM, wait this long for running tasks")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    _common(parser)


def load_object(spec: str) -> Any:
    """``package.module:attr.path`` → the object (the current directory is importable)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def run_worker(args: argparse.Namespace) -> int:
    import logging
    import signal

    from silo.client import SiloError, TopologyError
    from silo.worker import Worker

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        handler = load_object(args.handler)
        refresh = load_object(args.refresh_handler) if args.refresh_handler else None
    except (ImportError, AttributeError, ValueError) as e:
        return _fail(f"cannot load handler: {e}", EXIT_USAGE, "USAGE")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                print("silo worker: second signal, exiting now", file=sys.stderr, flush=True)
                os._exit(130)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        async with _client(args) as client:
            client.topology_refresh_interval_s = 30.0
            client.max_retries = 8
            worker = Worker(client, args.task_group, handler, concurrency=args.concurrency,
                            pollers=args.pollers, tasks_per_poll=args.tasks_per_poll,
                            poll_interval=args.poll_interval,
                            heartbeat_interval=args.heartbeat_interval,
                            worker_id=args.worker_id, refresh_handler=refresh)
            await worker.start()
            print(f"silo worker {worker.worker_id} polling task group {args.task_group!r} "
                  f"on {args.server} (concurrency {args.concurrency})",
                  file=sys.stderr, flush=True)
            await stop.wait()
            print(f"silo worker: stopping, waiting up to {args.stop_timeout:g} s for "
                  f"{worker.active_tasks} running task(s)", file=sys.stderr, flush=True)
            clean = await worker.stop(args.stop_timeout)
            s = worker.stats
            print(f"silo worker: stopped ({s.succeeded} succeeded, {s.failed} failed, "
                  f"{s.cancelled} cancelled, {s.dropped} dropped)", file=sys.stderr, flush=True)
            return 0 if clean else EXIT_ERROR

    try:
        return _run_loop(main())
    except TopologyError as e:
        return _fail(f"cannot reach the cluster at {args.server}: {e}", status="UNREACHABLE")
    except SiloError as e:
        return _fail(e.message, status=e.code_name)


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _query_command():
    from silo import cli_query  # noqa: PLC0415 - cli_query builds on this module

    return cli_query.configure, cli_query.run


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "worker": ("run a worker: MODULE:FUNCTION handles the tasks of a task group",
               configure_worker, run_worker),
    "enqueue": ("enqueue a job (payload as JSON)", configure_enqueue, run_enqueue),
    "job": ("get, result, cancel, restart, expedite or delete a job", configure_job, run_job),
    "tenant": ("hash a tenant or locate its shard", configure_tenant, run_tenant),
    "cluster": ("cluster info: shards, ranges and owners", configure_cluster, run_cluster),
    "query": ("run SQL on a tenant's shard, one shard or all shards", *_query_command()),
    "profile": ("capture a CPU profile of a server", configure_profile, run_profile),
}
