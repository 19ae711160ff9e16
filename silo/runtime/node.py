"""A node: the shards this process owns, opened from the persisted shard map.

Opens every owned shard, runs the lease reaper over them, and closes them (flushing
everything staged) on shutdown. Holds no job logic: that is silo.shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from silo.cluster.shardmap import ShardMap
from silo.shard.reaper import reap_expired_leases
from silo.shard.state import Shard, ShardConfig

log = logging.getLogger(__name__)


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
    ) -> None:
        self.node_id = str(uuid.uuid4())
        self.shard_map = shard_map
        self.store_url = store_url
        self.shard_config = shard_config
        self.tenancy = tenancy
        self.dev_mode = dev_mode
        self.advertised_addr = advertised_addr
        self.reaper_interval_s = reaper_interval_ms / 1000
        self.shards: dict[str, Shard] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        entries = self.shard_map.entries
        opened = await asyncio.gather(*(
            Shard.open(e.shard_id, e.range_start, e.range_end, self.store_url,
                       self.shard_config) for e in entries))
        for s in opened:
            self.shards[s.id] = s
        self._reaper = asyncio.create_task(self._reap_forever(), name="silo-reaper")

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reaper_interval_s)
            for shard in list(self.shards.values()):
                try:
                    await reap_expired_leases(shard)
                except Exception:  # noqa: BLE001 - one shard's failure must not stop the others
                    log.exception("lease reaper failed on shard %s", shard.id)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(s.close() for s in self.shards.values()),
                             return_exceptions=True)
        self.shards.clear()
