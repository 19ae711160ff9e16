"""Tenant → shard routing on the client side.

A tenant's position in hash space is XXH64 of its UTF-8 bytes with seed 0, written as
16 lowercase hex digits. Every shard owns the half-open range ``[range_start, range_end)``
of that space by string comparison, where ``""`` means −∞ as a start and +∞ as an end.
No tenant routes as the default tenant ``"-"``.

:class:`Topology` is built from a GetClusterInfo reply: only ``shard_id``, ``grpc_addr``,
``range_start`` and ``range_end`` are read, owners without an address are dropped, and the
shards are sorted by ``range_start``. A lookup is a binary search for the last shard
starting at or before the key, then a check that the key is below its end.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import xxhash

from silo.client.errors import TopologyError

DEFAULT_TENANT = "-"

_xxh64_hex = xxhash.xxh64_hexdigest


def hash_tenant(tenant: str | None) -> str:
    """XXH64(seed 0) of the tenant's UTF-8 bytes as 16 lowercase hex digits; None/"" → "-"."""
    return _xxh64_hex((tenant or DEFAULT_TENANT).encode(), seed=0)


def hash_key(tenant: str) -> str:
    """The raw hash of exactly this string (``hash_key("")`` hashes the empty string)."""
    return _xxh64_hex(tenant.encode(), seed=0)


def in_range(key: str, start: str, end: str) -> bool:
    return (start == "" or key >= start) and (end == "" or key < end)


@dataclass(slots=True)
class ShardInfo:
    shard_id: str
    grpc_addr: str
    range_start: str
    range_end: str
    node_id: str = ""


class Topology:
    """The shard map a client routes by; immutable except for owner re-pointing."""

    __slots__ = ("shards", "_starts", "by_id")

    def __init__(self, shards: Iterable[ShardInfo]) -> None:
        self.shards: list[ShardInfo] = sorted(shards, key=lambda s: s.range_start)
        self._starts = [s.range_start for s in self.shards]
        self.by_id = {s.shard_id: s for s in self.shards}

    @classmethod
    def from_cluster_info(cls, info, address_map: Callable[[str], str] | None = None
                          ) -> Topology:
        """From a GetClusterInfoResponse (or anything with ``shard_owners``)."""
        shards = []
        for o in info.shard_owners:
            if not o.grpc_addr:
                continue
            addr = address_map(o.grpc_addr) if address_map else o.grpc_addr
            shards.append(ShardInfo(o.shard_id, addr, o.range_start, o.range_end,
                                    getattr(o, "node_id", "")))
        return cls(shards)

    @property
    def addresses(self) -> list[str]:
        """Distinct owner addresses, in shard order."""
        return list(dict.fromkeys(s.grpc_addr for s in self.shards))

    def shard_for_key(self, key: str) -> ShardInfo:
        """The shard whose range holds this hex key."""
        if not self.shards:
            raise TopologyError("Cluster topology not discovered yet")
        # bisect_right finds the first start > key; "" sorts first, i.e. -inf.
        i = bisect.bisect_right(self._starts, key) - 1
        if i >= 0:
            s = self.shards[i]
            if s.range_end == "" or key < s.range_end:
                return s
        raise TopologyError(f"No shard found for tenant hash {key}")

    def shard_for_tenant(self, tenant: str | None) -> ShardInfo:
        return self.shard_for_key(hash_tenant(tenant))

    def set_owner(self, shard_id: str, addr: str) -> None:
        s = self.by_id.get(shard_id)
        if s is not None:
            s.grpc_addr = addr
