"""A node's view from one worker process: the shards it owns, and who owns the rest.

Opens this process's shards from the persisted shard map, runs the lease reaper over
them, publishes each shard's pending-task count to the other processes (a shared
memory array the supervisor maps before forking) and holds the Unix-socket clients
of the other processes, so a call for a shard it does not own can be forwarded.
Holds no job logic: that is silo.shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import struct
import time
import uuid

from silo.cluster.shardmap import ShardMap
from silo.observability import events, metrics
from silo.runtime.forward import PeerClient
from silo.runtime.status import SERVING, UNRESPONSIVE, ProcessTable
from silo.shard import depth
from silo.shard.memtable_flush import maybe_flush_memtable
from silo.shard.reaper import reap_expired_leases
from silo.shard.retention import expire_due
from silo.shard.state import Shard, ShardConfig
from silo.storage import local_sync

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<q")


class Node:
    def __init__(
        self,
        shard_map: ShardMap,
        store_url: str,
        shard_config: ShardConfig,
        *,
        tenancy: bool,
        dev_mode: bool,
        advertised_addr: str,
        reaper_interval_ms: int,
        node_id: str | None = None,
        index: int = 0,
        owner_of: dict[str, int] | None = None,
        peer_paths: dict[int, str] | None = None,
        counts: mmap.mmap | None = None,
        peer_secret: bytes = b"",
        forward_timeout_ms: int = 5000,
        table: ProcessTable | None = None,
    ) -> None:
        self.node_id = node_id or str(uuid.uuid4())
        self.shard_map = shard_map
        self.store_url = store_url
        self.shard_config = shard_config
        self.tenancy = tenancy
        self.dev_mode = dev_mode
        self.advertised_addr = advertised_addr
        self.reaper_interval_s = reaper_interval_ms / 1000
        self.index = index
        # Every shard is ours unless the supervisor says otherwise (single process).
        self.owner_of = owner_of or {e.shard_id: index for e in shard_map.entries}
        self.table = table  # the supervisor's view of every process, when supervised
        self.peers = {i: PeerClient(p, f"w{i}", peer_secret, forward_timeout_ms / 1000,
                                    unresponsive=self._unresponsive_check(i))
                      for i, p in (peer_paths or {}).items() if i != index}
        self.slot = {e.shard_id: i for i, e in enumerate(shard_map.entries)}
        self.counts = counts
        self.shards: dict[str, Shard] = {}
        self._reaper: asyncio.Task[None] | None = None

    def _unresponsive_check(self, index: int):
        table = self.table
        if table is None:
            return None
        return lambda: table.state(index) == UNRESPONSIVE

    def peer_ready(self, index: int) -> bool:
        """Whether process `index` is worth asking now: serving, as far as the supervisor
        knows, and not silent on our last call to it (LeaseTasks skips it otherwise)."""
        if self.table is not None and self.table.state(index) != SERVING:
            return False
        peer = self.peers.get(index)
        return peer is not None and not peer.silent

    @property
    def owned(self) -> list[str]:
        return [sid for sid, owner in self.owner_of.items() if owner == self.index]

    async def open(self) -> None:
        by_id = self.shard_map.by_id

        async def open_one(sid: str) -> Shard:
            t0 = time.perf_counter()
            s = await Shard.open(sid, by_id[sid].range_start, by_id[sid].range_end,
                                 self.store_url, self.shard_config, count_depth=False)
            events.shard_opened(s, time.perf_counter() - t0)
            return s

        opened = await asyncio.gather(*(open_one(sid) for sid in self.owned))
        for s in opened:
            self.shards[s.id] = s
            self.publish(s)
        self._reaper = asyncio.create_task(self._reap_forever(), name="silo-reaper")

    def start_depth_counts(self) -> None:
        """Count the queue of each older shard that has no task-group counters yet (once,
        in the background; silo.shard.depth): called once this process serves, so no
        lease waits behind a scan of the backlog."""
        for s in self.shards.values():
            depth.start_count(s)

    # ---- pending-work hints shared between processes -------------------------------

    def publish(self, shard: Shard) -> None:
        """Tell the other processes how many tasks this shard has pending."""
        if self.counts is not None:
            _COUNT.pack_into(self.counts, self.slot[shard.id] * 8, shard.pending_hint())

    def pending(self, shard_id: str) -> int:
        if self.counts is None:
            s = self.shards.get(shard_id)
            return s.pending_hint() if s is not None else 0
        return _COUNT.unpack_from(self.counts, self.slot[shard_id] * 8)[0]

    def processes_with_work(self) -> dict[int, int]:
        """Process index → number of its shards that have pending tasks."""
        out: dict[int, int] = {}
        for sid, owner in self.owner_of.items():
            if self.pending(sid) > 0:
                out[owner] = out.get(owner, 0) + 1
        return out

    # ---- background ----------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reaper_interval_s)
            for shard in list(self.shards.values()):
                labels = (shard.id,)
                t0 = time.perf_counter()
                try:
                    metrics.REAPER_REAPED.inc(labels, await reap_expired_leases(shard))
                except Exception:  # noqa: BLE001 - one shard's failure must not stop the others
                    metrics.REAPER_ERRORS.inc(labels)
                    log.exception("lease reaper failed on shard %s", shard.id)
                metrics.REAPER_SCANS.inc(labels)
                metrics.REAPER_DURATION.observe(labels, time.perf_counter() - t0)
                try:
                    await expire_due(shard)  # retention: finished jobs past their TTL
                except Exception:  # noqa: BLE001
                    log.exception("retention sweep failed on shard %s", shard.id)
                try:
                    await maybe_flush_memtable(shard)  # WAL objects become garbage
                except Exception:  # noqa: BLE001
                    log.exception("memtable flush failed on shard %s", shard.id)
                self.publish(shard)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for p in self.peers.values():
            await p.close()
        async def close_one(s: Shard) -> None:
            t0 = time.perf_counter()
            await s.close()
            events.shard_closed(s.id, time.perf_counter() - t0)

        await asyncio.gather(*(close_one(s) for s in self.shards.values()),
                             return_exceptions=True)
        # What the closes wrote (L0 SSTs, manifests) on disk before the process exits.
        await local_sync.final_pass([s.db for s in self.shards.values()])
        self.shards.clear()
