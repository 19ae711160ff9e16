"""bench/limits.py's harness: its constants, the server (common.ServerProc with --tenancy),
client processes, CPU readings, routing and error counting shared by its scenarios."""


import argparse
import asyncio
import copy
import importlib
import math
import os
import re
import signal
import statistics
import sys
import time
from collections import Counter
from typing import Any

import common

CLIENT_START_TIMEOUT_S = 60.0
ERROR_SLEEP_S = 0.05
EMPTY_POLL_SLEEP_S = 0.005
PRIORITY = 50
OTHER_LOAD_WARN_CORES = 0.25

# grant-latency
GRANT_TENANT = "bench-grant"
GRANT_KEY = "bench-grant-slot"
GRANT_WAIT_S = 10.0  # a release not followed by a grant within this long is an error
# limited-throughput
TP_TENANTS = [f"bench-{i}" for i in range(4)]
TP_MAX_CONCURRENCY = 100
TP_LEASE_BATCH = 16

TARGETS = {
    "grant_p50_ms": 5.0,
    "grant_p99_ms": 25.0,
    "limited_pct_of_unlimited": 80.0,
}


# ---------------------------------------------------------------------------
# /proc: CPU of the server (and the worker processes it forks), clients, machine
# ---------------------------------------------------------------------------


def tree_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds of pid and every live descendant, by pid."""
    return common.tree_cpu_by_pid(pid) if pid else {}


class CpuSnap:
    """One reading of server tree, client processes and machine CPU."""

    def __init__(self, server_pid: int | None, client_pids: list[int]):
        self.t = time.monotonic()
        self.server = tree_cpu(server_pid)
        self.clients = sum(c for p in client_pids if (c := common.proc_cpu_s(p)) is not None)
        self.machine = common.machine_cpu()


def cpu_between(a: CpuSnap, b: CpuSnap) -> dict[str, Any]:
    secs = max(1e-9, b.t - a.t)
    srv = sum(b.server.values()) - sum(a.server.get(p, 0.0) for p in b.server)
    per_proc = sorted(((c - a.server.get(p, 0.0)) / secs for p, c in b.server.items()), reverse=True)
    cli = b.clients - a.clients
    busy = (b.machine[0] - a.machine[0]) / max(1, b.machine[1] - a.machine[1])
    ncpu = os.cpu_count() or 1
    return {
        "seconds": round(secs, 3),
        "server_cpu_s": round(srv, 3),
        "server_cpu_cores": round(srv / secs, 3),
        "server_cpu_cores_by_process": [round(x, 2) for x in per_proc if x >= 0.005],
        "loadgen_cpu_s": round(cli, 3),
        "loadgen_cpu_cores": round(cli / secs, 3),
        "machine_busy_pct": round(100 * busy, 1),
        # busy cores nobody here accounts for: other processes on the machine
        "other_cpu_cores": round(busy * ncpu - (srv + cli) / secs, 2),
    }


busy_pct = common.busy_pct
machine_info = common.machine_info


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def pcts_ms(samples_s: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max (nearest rank) of samples in seconds, as ms."""
    if not samples_s:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    s = sorted(samples_s)
    n = len(s)

    def rank(q: float) -> float:
        return round(1000 * s[min(n - 1, max(0, math.ceil(q * n) - 1))], 3)

    return {"n": n, "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
            "max": round(1000 * s[-1], 3), "mean": round(1000 * statistics.fmean(s), 3)}


def route(owners: list[tuple[str, str, str]], tenant: str) -> str:
    """The shard whose half-open [range_start, range_end) holds XXH64(tenant) ("" = open)."""
    import xxhash

    h = xxhash.xxh64_hexdigest(tenant.encode("utf-8"))
    for shard, lo, hi in owners:
        if (not lo or lo <= h) and (not hi or h < hi):
            return shard
    raise RuntimeError(f"no shard owns tenant {tenant!r} (hash {h})")


def topology(target: str) -> list[tuple[str, str, str]]:
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        info = pb_grpc.SiloStub(ch).GetClusterInfo(pb.GetClusterInfoRequest(), timeout=10)
    owners = sorted(((o.shard_id, o.range_start, o.range_end) for o in info.shard_owners),
                    key=lambda o: o[1])
    if not owners:
        raise RuntimeError("GetClusterInfo listed no shard")
    return owners


def rpc_error_key(rpc: str, exc: BaseException) -> tuple[str, str]:
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        code, msg = exc.code().name, exc.details() or ""
    else:
        code, msg = "CLIENT_" + type(exc).__name__, str(exc)
    return f"{rpc}:{code}", f"{rpc}:{code}: {msg[:200]}"


class Errors:
    def __init__(self) -> None:
        self.by_code: Counter[str] = Counter()
        self.msgs: Counter[str] = Counter()

    def add(self, rpc: str, exc: BaseException) -> None:
        code, msg = rpc_error_key(rpc, exc)
        self.by_code[code] += 1
        if msg in self.msgs or len(self.msgs) < 20:
            self.msgs[msg] += 1

    def dump(self) -> dict[str, Any]:
        return {"errors": dict(self.by_code), "error_messages": dict(self.msgs)}


async def open_stub(target: str) -> tuple[Any, Any]:
    import grpc

    from silo._proto import silo_pb2_grpc as pb_grpc

    ch = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    await asyncio.wait_for(ch.channel_ready(), timeout=15)
    return ch, pb_grpc.SiloStub(ch)


def client_entry(fn_name: str, *a: Any) -> None:
    """Body of every spawned client process: run one coroutine on a fresh uvloop loop and
    hand its result (or what killed it) to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    import uvloop

    result_q = a[-1]
    try:
        module, name = fn_name.split(":")
        res = uvloop.run(getattr(importlib.import_module(module), name)(*a[:-1]))
    except BaseException as e:  # the parent must never wait for a silent child
        res = {"fatal": f"{type(e).__name__}: {e}"}
    result_q.put(res)


async def wait_event(ev: Any, timeout: float) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, ev.wait, timeout)


# ---------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------


class Server(common.ServerProc):
    """`silo serve --tenancy` on 127.0.0.1:0 with a temp data dir (common.ServerProc)."""

    def __init__(self, args: argparse.Namespace):
        args = copy.copy(args)
        args.tenants = 1  # every limits scenario runs with tenancy on
        super().__init__(args)
        self.cmd = self.command()

    def text(self) -> str:
        return self.log_text()

    def shard_process(self) -> dict[str, str]:
        """shard id -> the worker process ("w0", "w1", ...) that opened it, from the log."""
        return {m.group(2): f"w{m.group(1)}" for m in
                re.finditer(r"^\[w(\d+)\].*?\bshard ([0-9a-f-]{36}) opened", self.text(), re.M)}

    def warnings(self) -> list[str]:
        return [ln for ln in self.text().splitlines()
                if re.search(r"\b(ERROR|WARNING|CRITICAL)\b|Traceback", ln)][:50]


def with_server(args: argparse.Namespace, label: str, body: Any) -> dict[str, Any]:
    """Run body(server, target) against a fresh server; always stop it."""
    srv = Server(args)
    try:
        target = srv.start()
        print(f"[{label}] server pid {srv.pid} on {target}", file=sys.stderr, flush=True)
        try:
            res = body(srv, target)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            res = {"fatal": f"{type(e).__name__}: {e}"}
        res["server_alive_at_end"] = srv.alive()
        code = srv.stop()
        res["server_exit_code"] = code
        res["server_log_warnings"] = srv.warnings()
        if res.get("error_total") or "fatal" in res or code not in (0, None):
            res["server_stderr_tail"] = srv.tail(40)
        res["server_cmd"] = srv.cmd
        return res
    finally:
        srv.stop()
        srv.cleanup()


def spawn(ctx: Any, name: str, fn_name: str, *a: Any) -> Any:
    p = ctx.Process(target=client_entry, name=name, daemon=True, args=(fn_name, *a))
    p.start()
    return p


