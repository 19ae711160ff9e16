"""Process-wide set-up shared by the supervisor and its workers: logging, the data dir
lock, GC tuning, and the `run_server` entry point of `silo serve`."""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import sys
from pathlib import Path

import orjson

from silo.config import Config

log = logging.getLogger("silo")

LOCK_FILE = "silo.lock"


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if self.worker is not None:
            doc["worker"] = self.worker
        doc.update(getattr(record, "silo_fields", ()))  # structured events (observability)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """Log to stderr; a worker process tags its lines (`[wN] …`, or a "worker" field)."""
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[w{worker}] " if worker is not None else ""
    handler.setFormatter(_JsonFormatter(worker) if fmt == "json" else logging.Formatter(
        tag + "%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


def run_server(config: Config) -> int:
    """`silo serve`: the supervisor, which forks the worker processes."""
    from silo.runtime.supervisor import Supervisor  # noqa: PLC0415 - import cycle

    setup_logging(config.log_level, config.log_format)
    return Supervisor(config).run()
