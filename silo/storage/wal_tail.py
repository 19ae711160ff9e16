"""Torn WAL objects at the tail of a local store, found and moved aside before SlateDB opens.

Why: on a local directory store a power loss (or kernel crash) can leave a WAL object
whose directory entry reached the disk but whose data did not: empty, cut short, or
zeros/stale blocks (ext4 without a journal orders nothing). SlateDB 0.17 then refuses
to open the database (`Data error: wal data error (unsupported SST format version …
actual_version=0)` for a short or zeroed object, `… (checksum mismatch in …/wal/N.sst)`
for a torn page under an intact footer; an empty object it takes for a fence and
skips), so the worker exits and the server gives up, although every acknowledged write
is intact: an object can only be torn if it was never fsynced, and Silo answers no write
before its WAL object and every earlier one are fsynced (silo.storage.local_sync).

What this module does, for `file://` stores only (an object-store PUT is atomic):

* Reads the latest manifest's `replay_after_wal_id` (SlateDB replays only the WAL
  objects after it; older ones are already in an L0 SST and are never read), then reads
  each newer object and checks it against SlateDB's SST layout (`check_object`): the
  footer, the CRC-32 of the info block, of the filter/index/stats blocks and of every
  data block. Only evidence of tearing (a checksum that does not match, a footer no
  SlateDB writes) makes an object torn; what the reader does not understand is left to
  SlateDB, since a false "torn" would move acknowledged writes aside.
* `plan` (pure) decides. A torn object with only torn or empty objects after it is a
  torn tail: it and every object after it are moved into `torn/` beside `wal/` in the
  database's directory (never deleted: an operator can look at them) and one warning
  names them. The empty ones go too: SlateDB 0.17 requires the WAL ids it replays to be
  contiguous (`wal truncated at wal file 7` when 7 is missing and 8 exists), and every
  failed open before this step existed wrote one more empty fence after the torn one.
  A torn object followed by an intact non-empty one is refused with a one-line error
  naming the shard and both files: with several commits in flight the kernel may write
  a later unsynced object before an earlier one, and dropping the torn one and every
  later one is safe only if every process that wrote this WAL had storage.local_fsync
  on and this pre-open sync (older Silo versions did not), which this process cannot
  know; the operator can (the error says what to move).
* With `storage.local_fsync` on, makes every intact object SlateDB is about to replay
  durable (one syncfs of the filesystem, else an fsync each, then `wal/`) before the
  open: a predecessor killed before its fsync round left such objects in the page cache
  only, and writes acknowledged after this open build on what they replay (a job
  enqueued there, then leased and acknowledged here).

Not covered: an empty object is what SlateDB writes as the fence of every open, so an
empty object is never taken for a torn one. An unacknowledged object torn to 0 bytes with
an intact unacknowledged one after it is then replayed without it (SlateDB skips empty
objects; nothing acknowledged is lost, but the later commit is applied without the one
before it). Compressed data blocks (storage.slatedb compression_codec) are not checked
(the index that locates them is compressed): a torn one there is refused by SlateDB.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

from slatedb.uniffi import AdminBuilder

from silo.storage import local_sync

log = logging.getLogger(__name__)

__all__ = ["TornStoreError", "TornWalError", "WalObject", "Plan", "check_object", "plan", "recover"]

TORN_DIR = "torn"
_FOOTER = 10  # u64 offset of the info block + u16 format version, big-endian
_CRC = 4  # every block ends with the CRC-32 of the bytes before it, big-endian
_VERSIONS = (1, 2)
# SsTableInfo fields (schemas/sst.fbs), by position in the table
_INDEX_OFFSET, _INDEX_LEN, _FILTER_OFFSET, _FILTER_LEN, _COMPRESSION = 1, 2, 3, 4, 5
_STATS_OFFSET, _STATS_LEN = 8, 9


class TornStoreError(RuntimeError):
    """A torn tail of the local store (WAL, manifest, compactor state) that cannot be
    repaired without guessing: the shard does not open. The message is one line naming
    the shard and the files (the worker logs it as is, without a traceback)."""


class TornWalError(TornStoreError):
    """The WAL cannot be repaired without guessing: the shard does not open."""


class WalObject(NamedTuple):
    wal_id: int
    size: int
    problem: str | None  # None: intact (or empty); else why it is torn


class Plan(NamedTuple):
    drop: tuple[int, ...]  # ids of the objects to move aside (the torn tail)
    refuse: tuple[int, int] | None  # (torn id, intact id after it): do not open


# ---- the object format (pure) ------------------------------------------------------


class _Malformed(ValueError):
    """A table this reader does not understand (not evidence of tearing)."""


class _Torn(ValueError):
    """A checksum that does not match, or a footer no SlateDB writes: torn."""


def _u(fmt: str, buf: bytes, pos: int) -> int:
    if pos < 0 or pos + struct.calcsize(fmt) > len(buf):
        raise _Malformed("offset out of range")
    return struct.unpack_from(fmt, buf, pos)[0]


class _Table:
    """Just enough of a FlatBuffers table reader for the two tables checked here."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.vtable = pos - _u("<i", buf, pos)
        self.vt_size = _u("<H", buf, self.vtable)

    def _field(self, i: int) -> int:
        at = 4 + 2 * i
        return _u("<H", self.buf, self.vtable + at) if at < self.vt_size else 0

    def scalar(self, i: int, fmt: str) -> int:
        off = self._field(i)
        return _u(fmt, self.buf, self.pos + off) if off else 0

    def tables(self, i: int) -> list[_Table]:
        """The tables of vector field i."""
        off = self._field(i)
        if not off:
            return []
        at = self.pos + off
        vec = at + _u("<I", self.buf, at)
        n = _u("<I", self.buf, vec)
        out = []
        for k in range(n):
            e = vec + 4 + 4 * k
            out.append(_Table(self.buf, e + _u("<I", self.buf, e)))
        return out


def _root(buf: bytes) -> _Table:
    return _Table(buf, _u("<I", buf, 0))


def _checked(data: bytes, start: int, length: int, what: str) -> bytes:
    """The payload of the block at [start, start+length): _Torn if its checksum does not
    match, _Malformed if the range (read from checksummed metadata) is not in the file."""
    end = start + length
    if start < 0 or length <= _CRC or end > len(data):
        raise _Malformed(f"{what} out of range")
    payload = data[start:end - _CRC]
    if zlib.crc32(payload) != _u(">I", data, end - _CRC):
        raise _Torn(f"{what} checksum mismatch")
    return payload


def check_object(data: bytes) -> str | None:
    """Why this WAL object (its whole content) is torn, or None if it is intact or empty.

    Checks what SlateDB checks when it replays the object: the footer, the CRC-32 of the
    info block, of the filter, index and stats blocks, and of each data block the index
    lists. Only evidence of tearing makes it torn: a footer pointing outside the object,
    a checksum that does not match. What this reader does not understand in checksummed
    metadata (a format version after 2, compressed blocks whose index it cannot read, a
    table it cannot parse) counts as intact and is left to SlateDB: a false "intact"
    costs an open SlateDB refuses, a false "torn" would move acknowledged writes aside."""
    n = len(data)
    if n == 0:
        return None  # a fence (or an object torn to nothing: indistinguishable)
    if n < _FOOTER + _CRC + 1:
        return f"{n} bytes, shorter than a footer and an info block"
    meta = _u(">Q", data, n - _FOOTER)
    version = _u(">H", data, n - 2)
    try:
        if version == 0:
            raise _Torn("format version 0 in the footer: zeros, or cut short")
        if meta > n - _FOOTER - _CRC - 1:
            raise _Torn(f"footer (format version {version}) points outside the object")
        info_bytes = _checked(data, meta, n - _FOOTER - meta, "info block")
        if version not in _VERSIONS:
            return None  # checksummed, in a format this reader does not know
        info = _root(info_bytes)
        index_offset = info.scalar(_INDEX_OFFSET, "<Q")
        index = _checked(data, index_offset, info.scalar(_INDEX_LEN, "<Q"), "index block")
        blocks_end = info.scalar(_FILTER_OFFSET, "<Q")
        if info.scalar(_FILTER_LEN, "<Q"):
            _checked(data, blocks_end, info.scalar(_FILTER_LEN, "<Q"), "filter block")
        if info.scalar(_STATS_LEN, "<Q"):
            _checked(data, info.scalar(_STATS_OFFSET, "<Q"), info.scalar(_STATS_LEN, "<Q"),
                     "stats block")
        if info.scalar(_COMPRESSION, "<b"):
            return None  # the index is compressed: its blocks are left to SlateDB
        starts = [b.scalar(0, "<Q") for b in _root(index).tables(0)]
        if starts != sorted(starts) or (starts and starts[-1] >= blocks_end):
            raise _Malformed("index lists blocks out of order")
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else blocks_end
            _checked(data, start, end - start, f"data block {k}")
    except _Torn as e:
        return str(e)
    except _Malformed:
        return None
    return None


# ---- the policy (pure) -------------------------------------------------------------


def plan(objects: Sequence[WalObject], replay_after: int) -> Plan:
    """What to do with the WAL objects SlateDB would replay (ids above replay_after).

    No torn object: nothing. Torn objects with nothing but torn or empty objects after
    the first of them: drop that one and every later one (a torn one was never fsynced,
    so none of its writes was acknowledged; an empty one carries no writes, and SlateDB
    refuses a gap in the ids it replays). A torn object followed by an intact one
    carrying writes: refuse (see the module docstring)."""
    replayed = sorted((o for o in objects if o.wal_id > replay_after), key=lambda o: o.wal_id)
    first = next((i for i, o in enumerate(replayed) if o.problem is not None), None)
    if first is None:
        return Plan((), None)
    tail = replayed[first:]
    intact = next((o for o in tail if o.problem is None and o.size > 0), None)
    if intact is not None:
        return Plan((), (replayed[first].wal_id, intact.wal_id))
    return Plan(tuple(o.wal_id for o in tail), None)


# ---- on disk -----------------------------------------------------------------------


def scan(wal_dir: str, replay_after: int) -> list[WalObject]:
    """The WAL objects above replay_after, each read and checked."""
    try:
        names = os.listdir(wal_dir)
    except FileNotFoundError:
        return []
    out = []
    for wal_id in local_sync._wal_ids(names):
        if wal_id <= replay_after:
            continue
        with open(os.path.join(wal_dir, local_sync._wal_name(wal_id)), "rb") as f:
            data = f.read()
        out.append(WalObject(wal_id, len(data), check_object(data)))
    return out


def quarantine(db_dir: str, ids: Sequence[int], stamp: int) -> list[str]:
    """Move the WAL objects `ids` into `torn/` (named `<object>.<stamp>`, so a later torn
    object reusing the id does not collide), then fsync both directories: the move is
    durable before SlateDB reuses the ids. Returns the new paths."""
    wal_dir = os.path.join(db_dir, local_sync.WAL_DIR)
    torn_dir = os.path.join(db_dir, TORN_DIR)
    os.makedirs(torn_dir, exist_ok=True)
    moved = []
    for wal_id in ids:
        name = local_sync._wal_name(wal_id)
        dest = os.path.join(torn_dir, f"{name}.{stamp}")
        os.rename(os.path.join(wal_dir, name), dest)
        moved.append(dest)
    for d in (torn_dir, wal_dir, db_dir):
        local_sync._fsync_path(d, local_sync._O_DIR)
    return moved


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        f = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):  # not Linux
        return None
    f.argtypes = [ctypes.c_int]
    f.restype = ctypes.c_int
    return f


_SYNCFS = _libc_syncfs()


def syncfs(fd: int, path: str) -> None:
    """syncfs(2) of the filesystem holding the open `fd` (`path` names it): every dirty
    page and inode of it reaches the disk, in one call. The seam tests record through."""
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"syncfs of {path}: {os.strerror(e)}")


def sync_replayed(wal_dir: str, objects: Sequence[WalObject]) -> None:
    """Make the intact objects SlateDB will replay durable, with `wal/` (see the module
    docstring). One syncfs when the platform has it: after a kill the replay may hold
    thousands of objects still dirty in the page cache: after 2,000 killed commits the
    step took 1.17 s with an fsync each, 0.05-0.18 s with syncfs (checking them: 0.09 s;
    loaded box)."""
    if not any(o.problem is None and o.size > 0 for o in objects):
        return
    if _SYNCFS is not None:
        fd = os.open(wal_dir, local_sync._O_DIR)
        try:
            syncfs(fd, wal_dir)
        finally:
            os.close(fd)
        return
    for o in objects:
        if o.problem is None:
            local_sync._fsync_path(os.path.join(wal_dir, local_sync._wal_name(o.wal_id)))
    local_sync._fsync_path(wal_dir, local_sync._O_DIR)


def repair(db_dir: str, label: str, replay_after: int, fsync: bool) -> list[str]:
    """The whole step for one database directory (blocking): check, then move the torn
    tail aside or raise TornWalError; with fsync, make what will be replayed durable.
    Returns the paths of the moved objects."""
    wal_dir = os.path.join(db_dir, local_sync.WAL_DIR)
    objects = scan(wal_dir, replay_after)
    p = plan(objects, replay_after)
    problems = {o.wal_id: o.problem for o in objects}
    if p.refuse is not None:
        torn, intact = p.refuse
        raise TornWalError(
            f"{label}: WAL object {wal_dir}/{local_sync._wal_name(torn)} is torn "
            f"({problems[torn]}) but the later {local_sync._wal_name(intact)} is intact; "
            "not opening (to drop both and every object between and after them, none of "
            "them acknowledged if every process that wrote them had storage.local_fsync on, "
            f"move them into {os.path.join(db_dir, TORN_DIR)}/)")
    moved: list[str] = []
    if p.drop:
        moved = quarantine(db_dir, p.drop, int(time.time() * 1000))
        log.warning(
            "%s: moved the torn WAL tail to %s (%s): writes never acknowledged (power "
            "loss before their fsync)", label, os.path.join(db_dir, TORN_DIR),
            "; ".join(f"{local_sync._wal_name(i)}: {problems[i] or 'empty'}"
                      for i in p.drop))
    if fsync:
        sync_replayed(wal_dir, [o for o in objects if o.wal_id not in p.drop])
    return moved


async def _replay_after(path: str, store: object) -> int | None:
    """The latest manifest's replay_after_wal_id; 0 for a database without a manifest;
    None when the manifest cannot be read (SlateDB's open then reports why)."""
    try:
        m = await AdminBuilder(path, store).build().read_manifest(None)
    except Exception as e:  # noqa: BLE001 - left to the open, which says what is wrong
        log.debug("manifest of %s unreadable before the open: %s", path, e)
        return None
    return 0 if m is None else m.replay_after_wal_id


async def recover(store_url: str, name: str, path: str, store: object) -> list[str]:
    """Before SlateDB opens the database `name` (at `path` in `store`): the step above on a
    file:// store, nothing on any other. Raises TornWalError; returns the moved paths."""
    where = local_sync.local_dir(store_url, name)
    if where is None or not os.path.isdir(os.path.join(where[0], local_sync.WAL_DIR)):
        return []
    replay_after = await _replay_after(path, store)
    if replay_after is None:
        return []
    label = f"shard {name.removeprefix('shards/')}"
    return await asyncio.get_running_loop().run_in_executor(
        None, repair, where[0], label, replay_after, local_sync.ENABLED)
