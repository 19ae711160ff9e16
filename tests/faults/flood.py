"""A flood of big Enqueue payloads from many concurrent calls, with RSS sampling."""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.faults.tools import process_tree, rss_bytes

MAX_MSG = 128 * 1024 * 1024


@dataclass
class FloodResult:
    codes: collections.Counter = field(default_factory=collections.Counter)
    acked: list[str] = field(default_factory=list)
    peak_rss: dict[int, int] = field(default_factory=dict)  # pid → peak RSS bytes
    seconds: float = 0.0


class RssSampler:
    """Samples the RSS of a process tree every `interval` seconds in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.05) -> None:
        self.root = root_pid
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in process_tree(self.root):
                r = rss_bytes(pid)
                if r > self.peak.get(pid, 0):
                    self.peak[pid] = r
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def _flood(addr: str, shard: str, calls: int, concurrency: int, size: int,
                 channels: int, result: FloodResult) -> None:
    payload = os.urandom(size)
    opts = [("grpc.max_receive_message_length", MAX_MSG),
            ("grpc.max_send_message_length", MAX_MSG)]
    chans = [grpc.aio.insecure_channel(addr, options=opts + [("grpc.channel_id", i)])
             for i in range(channels)]  # distinct connections, spread over the processes
    stubs = [pb_grpc.SiloStub(c) for c in chans]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            try:
                r = await stubs[i % channels].Enqueue(pb.EnqueueRequest(
                    shard=shard, task_group="flood",
                    payload=pb.SerializedBytes(msgpack=payload)), timeout=60)
                result.codes["OK"] += 1
                result.acked.append(r.id)
            except grpc.aio.AioRpcError as e:
                result.codes[e.code().name] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for c in chans:
            await c.close()


def flood(addr: str, shard: str, root_pid: int, *, calls: int = 128, concurrency: int = 64,
          size: int = 10 << 20, channels: int = 16) -> FloodResult:
    """Send `calls` Enqueues of `size` bytes, `concurrency` at a time; sample RSS."""
    result = FloodResult()
    t0 = time.monotonic()
    with RssSampler(root_pid) as sampler:
        asyncio.run(_flood(addr, shard, calls, concurrency, size, channels, result))
    result.seconds = time.monotonic() - t0
    result.peak_rss = dict(sampler.peak)
    return result
