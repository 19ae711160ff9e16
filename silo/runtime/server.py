"""`silo serve`: open the shards, serve gRPC, shut down cleanly on SIGTERM/SIGINT.

One process serving every shard of the data dir. (The supervisor that forks one
worker per core builds on this; see the shard-per-core runtime issue.)
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import orjson
import uvloop

from silo.cluster.shardmap import load_or_create
from silo.config import Config
from silo.rpc.server import build_server, mark_serving
from silo.rpc.service import SiloService
from silo.runtime.node import Node
from silo.shard.state import ShardConfig

log = logging.getLogger("silo")

LOCK_FILE = "silo.lock"
DRAIN_TIMEOUT_S = 10.0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the life of the process."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        print(f"silo: data dir {data_dir} is in use by another silo server", file=sys.stderr)
        raise SystemExit(2) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def tune_gc() -> None:
    """Collect less often: every RPC allocates many short-lived containers, and
    CPython's default gen-0 threshold (700) made the cyclic collector a measurable share
    of server CPU under load. Long-lived start-up objects are frozen out of it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def check_port_free(addr: str) -> None:
    """Refuse a port another server holds: gRPC binds with SO_REUSEPORT and would share it."""
    host, port = addr.rsplit(":", 1)
    if int(port) == 0:
        return
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as e:
            print(f"silo: cannot listen on {addr}: {e.strerror}", file=sys.stderr)
            raise SystemExit(2) from None


def _host_of(addr: str) -> str:
    return addr.rsplit(":", 1)[0]


async def serve(config: Config) -> int:
    data_dir = Path(config.data_dir)
    lock_fd = lock_data_dir(data_dir)
    check_port_free(config.grpc_addr)
    shard_map, created = load_or_create(data_dir, config.shards)
    if not created and len(shard_map.entries) != config.shards:
        log.warning("data dir has %d shards; ignoring shards=%d (the shard map is kept)",
                    len(shard_map.entries), config.shards)
    node = Node(
        shard_map,
        config.object_store_url_resolved(),
        ShardConfig(lease_ms=config.lease_ms, flush_interval_ms=config.flush_interval_ms,
                    commit_interval_ms=config.commit_interval_ms,
                    l0_sst_size_bytes=config.l0_sst_size_bytes),
        tenancy=config.tenancy,
        dev_mode=config.dev_mode,
        advertised_addr=config.advertised_addr,
        reaper_interval_ms=config.reaper_interval_ms,
    )
    await node.open()
    tune_gc()
    server = build_server(SiloService(node, auth_token=config.auth_token),
                          config.max_message_bytes)
    try:
        port = server.add_insecure_port(config.grpc_addr)
    except RuntimeError as e:
        await node.close()
        print(f"silo: cannot listen on {config.grpc_addr}: {e}", file=sys.stderr)
        return 2
    bound = f"{_host_of(config.grpc_addr)}:{port}"
    if not node.advertised_addr:
        node.advertised_addr = bound
    await server.start()
    await mark_serving(server)
    log.info("silo serving on %s (advertised %s) data_dir=%s shards=%d tenancy=%s dev_mode=%s",
             bound, node.advertised_addr, data_dir.resolve(), len(node.shards),
             "on" if config.tenancy else "off", "on" if config.dev_mode else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining calls (up to %.0f s)", DRAIN_TIMEOUT_S)
    await server.stop(DRAIN_TIMEOUT_S)
    await node.close()
    os.close(lock_fd)
    log.info("silo stopped")
    return 0


def run_server(config: Config) -> int:
    setup_logging(config.log_level, config.log_format)
    return uvloop.run(serve(config))
