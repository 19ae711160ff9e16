"""Process-wide set-up shared by the supervisor and its workers: logging, the data dir
lock, GC tuning, and the `run_server` entry point of `silo serve`."""

from __future__ import annotations

import contextlib
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
    """Hold an exclusive lock on the data dir for the life of the process.

    The lock file is removed when the server exits (`unlock_data_dir`), so a locker
    checks that the file it locked is still the one at the path (else it raced with an
    exiting server and locked an unlinked file) and tries again."""
    from silo.runtime.checks import StartupError  # noqa: PLC0415 - avoid an import cycle

    path = data_dir / LOCK_FILE
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StartupError(f"storage.data_dir (SILO_DATA_DIR / --data-dir): cannot "
                               f"create {str(path)!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"data dir {data_dir} is in use by another silo server"
                               ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise StartupError(f"data dir {data_dir}: cannot take its lock file")


def unlock_data_dir(data_dir: Path, fd: int) -> None:
    """Remove the lock file (still holding the lock), then release it."""
    with contextlib.suppress(OSError):
        os.unlink(data_dir / LOCK_FILE)
    os.close(fd)


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
