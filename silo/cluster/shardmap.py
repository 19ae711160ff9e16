"""Tenant → shard routing: XXH64 hash ranges, and the persisted shard map.

A tenant's key is XXH64(utf-8 bytes, seed 0) written as 16 lowercase hex digits. Each
shard owns the half-open range [range_start, range_end) of that hex space by string
comparison; "" as a start means -inf and as an end +inf. The initial map with N shards
cuts 2^64 into N equal parts (boundary i = floor(i * 2^64 / N)), exactly as Silo's
clients expect, so a client that hashes a tenant lands on the shard we serve it from.

The map (random UUIDv4 shard ids + ranges) is written once to `<data_dir>/shardmap.json`
and reused on every start: a restarted server reopens the same shards with their data.
"""

from __future__ import annotations

import bisect
import os
import uuid
from pathlib import Path

import msgspec
import xxhash

from silo.storage.records import ShardMapEntry, ShardMapFile

DEFAULT_TENANT = "-"
SHARD_MAP_FILE = "shardmap.json"


def hash_tenant(tenant: str) -> str:
    """The tenant's position in hash space: XXH64 seed 0 as 16 lowercase hex digits."""
    return xxhash.xxh64_hexdigest(tenant.encode(), seed=0)


def initial_ranges(n: int) -> list[tuple[str, str]]:
    """N contiguous half-open ranges covering the whole hash space."""
    if n < 1:
        raise ValueError("shard count must be >= 1")
    bounds = [format((i << 64) // n, "016x") for i in range(1, n)]
    starts = [""] + bounds
    ends = bounds + [""]
    return list(zip(starts, ends, strict=True))


def in_range(key: str, start: str, end: str) -> bool:
    return (start == "" or key >= start) and (end == "" or key < end)


class ShardMap:
    """The ordered list of shards; answers which shard owns a tenant."""

    def __init__(self, entries: list[ShardMapEntry]) -> None:
        self.entries = sorted(entries, key=lambda e: e.range_start)
        self._starts = [e.range_start for e in self.entries]
        self.by_id = {e.shard_id: e for e in self.entries}
        _check_coverage(self.entries)

    @classmethod
    def create(cls, n: int) -> ShardMap:
        return cls(
            [ShardMapEntry(str(uuid.uuid4()), s, e) for s, e in initial_ranges(n)]
        )

    def shard_for_hash(self, key: str) -> ShardMapEntry:
        i = bisect.bisect_right(self._starts, key) - 1
        e = self.entries[max(i, 0)]
        if not in_range(key, e.range_start, e.range_end):
            raise LookupError(f"no shard owns hash {key}")
        return e

    def shard_for_tenant(self, tenant: str) -> ShardMapEntry:
        return self.shard_for_hash(hash_tenant(tenant))


def _check_coverage(entries: list[ShardMapEntry]) -> None:
    if not entries:
        raise ValueError("shard map is empty")
    if entries[0].range_start != "" or entries[-1].range_end != "":
        raise ValueError("shard map does not cover the whole hash space")
    for a, b in zip(entries, entries[1:], strict=False):
        if a.range_end != b.range_start:
            raise ValueError(f"shard map has a gap or overlap at {a.range_end!r}/{b.range_start!r}")


def load_or_create(data_dir: str | os.PathLike[str], n: int) -> tuple[ShardMap, bool]:
    """Read the persisted map, or create one with n shards. Returns (map, created)."""
    path = Path(data_dir) / SHARD_MAP_FILE
    if path.exists():
        f = msgspec.json.decode(path.read_bytes(), type=ShardMapFile)
        return ShardMap(f.shards), False
    m = ShardMap.create(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(ShardMapFile(1, m.entries))))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return m, True
