"""silo.storage.wal_tail's pure parts: which WAL objects are torn, and what to do about it.

`plan` is tested on made-up listings. `check_object` is tested on the bytes of WAL objects
the installed SlateDB wrote (so the checker follows the format SlateDB really writes,
not a copy of it), then cut, zeroed and bit-flipped the ways a power loss tears a file.
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib

import pytest

from silo.storage import db as sdb
from silo.storage import local_sync
from silo.storage.database import open_database
from silo.storage.wal_tail import Plan, WalObject, check_object, plan

PAGE = 4096


def ok(i: int, size: int = 300) -> WalObject:
    return WalObject(i, size, None)


def torn(i: int, size: int = 150) -> WalObject:
    return WalObject(i, size, "format version 0 in the footer")


def empty(i: int) -> WalObject:
    return WalObject(i, 0, None)


# ---- plan --------------------------------------------------------------------------


def test_nothing_torn_nothing_done() -> None:
    assert plan([empty(1), ok(2), ok(3), empty(4)], 0) == Plan((), None)
    assert plan([], 0) == Plan((), None)


def test_torn_newest_is_dropped() -> None:
    assert plan([empty(1), ok(2), torn(3)], 0) == Plan((3,), None)


def test_torn_tail_with_later_torn_and_empty_objects_is_dropped_whole() -> None:
    # the empty ones after a torn one go too: SlateDB refuses a gap in the replayed ids
    assert plan([ok(2), torn(3), empty(4), torn(5), empty(6)], 0) == Plan((3, 4, 5, 6), None)


def test_torn_before_intact_is_refused() -> None:
    assert plan([ok(2), torn(3), ok(4)], 0) == Plan((), (3, 4))
    assert plan([ok(2), torn(3), empty(4), torn(5), ok(6), torn(7)], 0) == Plan((), (3, 6))


def test_objects_in_an_l0_sst_are_ignored() -> None:
    # SlateDB does not replay ids <= replay_after_wal_id: torn or not, they stay
    assert plan([torn(2), ok(3), empty(4)], 3) == Plan((), None)
    assert plan([torn(2), ok(3), torn(4)], 3) == Plan((4,), None)


def test_order_of_the_listing_does_not_matter() -> None:
    assert plan([torn(5), ok(2), empty(4), torn(3)], 0) == Plan((3, 4, 5), None)


def test_empty_object_is_never_taken_for_torn() -> None:
    """An empty object is every open's fence: followed by data it is normal."""
    assert plan([empty(1), ok(2), empty(3), ok(4)], 0) == Plan((), None)


# ---- check_object on objects SlateDB wrote -----------------------------------------


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, bytes]:
    """{"small": one small commit's object, "large": one commit of ~60 KB, several
    data blocks} as the installed SlateDB wrote them."""
    root = tmp_path_factory.mktemp("wal")

    async def main() -> None:
        db = await open_database(f"file://{root}", "shards/s", flush_interval_ms=10,
                                     l0_sst_size_bytes=64 << 20, flush_on_commit=True)
        c = sdb.GroupCommitter(db, commit_interval_s=0)
        c.flush_on_commit = True
        c.put(b"k", b"v" * 100)
        await c.commit()
        for i in range(300):
            c.put(b"big%04d" % i, os.urandom(200))
        await c.commit()
        await c.close()
        await db.shutdown()
    asyncio.run(main())
    wal = root / "shards" / "s" / "wal"
    ids = local_sync._wal_ids(os.listdir(wal))
    blobs = [(wal / local_sync._wal_name(i)).read_bytes() for i in ids]
    data = [b for b in blobs if b]
    assert len(data) == 2 and len(data[1]) > 4 * PAGE
    return {"small": data[0], "large": data[1]}


def test_intact_and_empty_objects_pass(objects) -> None:
    assert check_object(objects["small"]) is None
    assert check_object(objects["large"]) is None
    assert check_object(b"") is None


@pytest.mark.parametrize("which", ["small", "large"])
def test_every_cut_is_found(objects, which) -> None:
    b = objects[which]
    step = 1 if which == "small" else 97
    missed = [n for n in range(1, len(b), step) if check_object(b[:n]) is None]
    assert missed == []


def test_every_bit_flip_in_a_small_object_is_found(objects) -> None:
    """Except in the format version: another version under a checksummed info block may
    be a newer SlateDB's, and is left to SlateDB (which refuses what it does not know)."""
    b = objects["small"]
    missed = [i for i in range(len(b) - 2) for bit in (0, 7)
              if check_object(b[:i] + bytes([b[i] ^ (1 << bit)]) + b[i + 1:]) is None]
    assert missed == []


def test_unknown_format_version_under_a_good_checksum_is_left_to_slatedb(objects) -> None:
    b = objects["small"]
    assert check_object(b[:-2] + (3).to_bytes(2, "big")) is None
    assert check_object(b[:-2] + (0).to_bytes(2, "big")) is not None  # no SlateDB writes 0


def test_what_the_reader_does_not_understand_is_not_torn(objects) -> None:
    """A checksummed info block that does not parse as this reader expects: intact (a
    false "torn" would move acknowledged writes aside)."""
    b = objects["small"]
    n = len(b)
    meta = struct.unpack(">Q", b[n - 10:n - 2])[0]
    junk = bytes(range(7, 7 + n - 10 - meta - 4))  # not a FlatBuffers table
    forged = b[:meta] + junk + zlib.crc32(junk).to_bytes(4, "big") + b[n - 10:]
    assert check_object(forged) is None


def test_zeros_are_found(objects) -> None:
    for b in objects.values():
        assert check_object(bytes(len(b))) is not None


def test_a_zeroed_page_under_an_intact_footer_is_found(objects) -> None:
    """Pages of one file reach the disk in any order: the footer may be there and a data
    page not. Caught by the data blocks' checksums, as SlateDB's replay would be."""
    b = objects["large"]
    for start in range(0, len(b) - PAGE, PAGE):
        z = b[:start] + bytes(PAGE) + b[start + PAGE:]
        assert check_object(z) is not None, start


def test_stale_bytes_in_place_of_a_page_are_found(objects) -> None:
    """A block the file was given but never written holds old disk content."""
    b = objects["large"]
    junk = objects["small"] * (PAGE // len(objects["small"]) + 1)
    z = b[:PAGE] + junk[:PAGE] + b[2 * PAGE:]
    assert check_object(z) is not None


def test_compressed_objects(tmp_path) -> None:
    """With `storage.slatedb` compression_codec set the index is compressed too: the
    checksums are still checked (over the compressed bytes), the data blocks are left
    to SlateDB (a torn page there under an intact footer: SlateDB refuses the open,
    `checksum mismatch in …/wal/N.sst`), and an intact object passes."""
    async def main() -> None:
        db = await open_database(f"file://{tmp_path}", "shards/s", flush_interval_ms=10,
                                     l0_sst_size_bytes=64 << 20, flush_on_commit=True,
                                     extra_settings={"compression_codec": "Lz4"})
        c = sdb.GroupCommitter(db, commit_interval_s=0)
        c.flush_on_commit = True
        for i in range(300):
            c.put(b"k%04d" % i, b"v" * 200)
        await c.commit()
        await c.close()
        await db.shutdown()
    asyncio.run(main())
    wal = tmp_path / "shards" / "s" / "wal"
    [b] = [p.read_bytes() for p in sorted(wal.iterdir()) if p.stat().st_size]
    assert check_object(b) is None
    assert check_object(b[:len(b) // 2]) is not None
    assert check_object(bytes(len(b))) is not None
