"""Helpers the fault tests share: a small tmpfs, health checks, RSS of a server's processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """Mount a tmpfs of size_mb at path for the block; raises PermissionError (with the
    reason) where mounting is not allowed, so tests can skip."""
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs: {p.stderr.strip() or p.returncode}")
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)  # a process still closing files on it
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave_bytes: int) -> Path:
    """Write a filler file so only about leave_bytes stay free on path's filesystem."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = path / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave_bytes)
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    return filler


def health(addr: str, service: str = "", timeout: float = 5.0) -> str:
    """The grpc.health.v1 status name of addr (one new connection, so one process)."""
    with grpc.insecure_channel(addr) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def wait_for(cond: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> object:
    """Poll cond until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out = [pid]
    i = 0
    while i < len(out):
        try:
            with open(f"/proc/{out[i]}/task/{out[i]}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
        i += 1
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
