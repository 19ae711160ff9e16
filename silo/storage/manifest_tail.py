"""A torn newest manifest (or compactor state) on a local store: opened from the one before
it when that is provably safe, else refused in one line.

Why: SlateDB writes manifests (`manifest/<id>.manifest`), SSTs and compactor state
without fsync; silo.storage.local_sync fsyncs them in a background pass about once a
second. After a power loss on an ext4 without a journal the newest manifest can be
empty or zeros (its directory entry reached the disk, its data did not), and SlateDB
0.17 then refuses to open the database (`Data error: empty manifest`, `… unsupported
manifest format version … actual_version=0`, or a flatbuffers range error for one cut
short), so the worker exits and the server gives up.

Why the previous manifest is a correct starting point (and only then): every write
Silo acknowledged is in a WAL object fsynced before the ack (local_sync). A manifest
is SlateDB's index of what is already in SSTs (`replay_after_wal_id`: every WAL object
up to it is in an L0 SST) plus fencing epochs. So the previous manifest M, its SSTs,
and every WAL object after M's `replay_after_wal_id` reconstruct every acknowledged
write by replay, whatever the torn one had added (an L0 flush, a compaction, an epoch
bump, a compactor checkpoint). `decide` (pure) opens from M only if:

* the newest manifest is torn by evidence: empty, shorter than its 2-byte version,
  version 0 (zeros), or SlateDB's own decoder rejects a version it supports (a
  manifest is published whole by a link, so only a tear leaves it undecodable); an
  unknown version is left to SlateDB (a newer SlateDB wrote it);
* M (the one before it) decodes, is initialized and is not a clone (external
  databases: their state is not in this directory);
* every SST M references is in `compacted/` and intact (silo.storage.wal_tail.
  check_object: the same SST layout). The garbage collector may have deleted SSTs the
  torn manifest compacted away; this is read only on this rare path, so all of it;
* the WAL objects after M's `replay_after_wal_id` are all there: contiguous ids up to
  the newest, at least up to the WAL id M had seen (`next_wal_sst_id` - 1), and no torn
  object before an intact one (wal_tail's plan). The garbage collector deletes WAL
  objects below the newest manifest's boundary; a deletion in M's range leaves a gap
  below the boundary object it keeps, which is refused;
* the compactor state SlateDB will start from (the newest in `compactions/`, or the
  one before it if that is torn, below) has a compactor epoch not above M's: measured, an open from M whose compactions file has a higher epoch (the
  torn manifest was the compactor's epoch bump) fails with `Closed error: detected
  newer DB client` (the compactor claims M's epoch + 1, which is fenced); it has no
  compaction submitted, running or compacted-but-not-committed (those may name SSTs
  only the torn manifest had), and no completed compaction whose output SSTs are on
  disk but not in M (the torn manifest committed it: how SlateDB's compactor treats a
  completed compaction its manifest lacks is not proven here, so it is refused, though
  one such open, tried by hand, had every job).

Then the torn manifest is moved into `torn/` (like wal_tail's objects, never deleted)
with one warning naming it, and SlateDB opens from M (writing the next manifest anew).
Anything else raises TornManifestError, one line naming the shard and the files; the
worker logs it without a traceback and exits 2, and `silo serve` exits 2 if no worker
could start (silo.runtime.supervisor).

The compactor state (`compactions/<id>.compactions`, same 2-byte version + flatbuffer)
tears the same way and SlateDB refuses it too (`invalid compaction` when empty,
`unsupported compactions format version … actual_version=0`). It holds no data, only
the compactor's epoch and its compactions' progress; the manifest is where a result is
committed. So a torn newest one is moved aside (`decide_compactions`) when the one
before it decodes, has no compaction left unfinished (one it calls running may already
be committed, by what the torn state recorded) and an epoch not above the manifest's;
a lone torn first one (written empty at the compactor's first start) goes without.

Not covered: only the newest file may be torn (two torn in a row are refused); a
manifest torn into stale blocks that still decode is not detected (a manifest has no
checksum); nor is the residual where the garbage collector's deletions of WAL objects
reached the disk but the directory entry of the boundary object it kept did not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from slatedb.uniffi import AdminBuilder, CompactionStatus

from silo.storage import local_sync, wal_tail

log = logging.getLogger(__name__)

__all__ = ["TornManifestError", "Manifest", "Compactions", "Decision", "decide",
           "decide_compactions", "torn_problem", "recover"]

MANIFEST_DIR = "manifest"
COMPACTIONS_DIR = "compactions"
COMPACTED_DIR = "compacted"
_VERSIONS = (1, 2)  # manifest and compactions formats SlateDB 0.17 reads
# not yet committed to a manifest (COMPACTED: output written, manifest not yet updated)
_UNFINISHED = frozenset({CompactionStatus.SUBMITTED, CompactionStatus.SCHEDULED,
                         CompactionStatus.RUNNING, CompactionStatus.COMPACTED})


class TornManifestError(wal_tail.TornStoreError):
    """The newest manifest or compactor state is torn and starting from the one before it
    is not provably safe: the shard does not open."""


class Manifest(NamedTuple):
    """What the policy needs of a decoded manifest."""
    id: int
    replay_after: int
    next_wal: int
    compactor_epoch: int
    initialized: bool
    clone: bool  # references external databases
    ssts: tuple[str, ...]  # ULIDs of every SST it references


class Compactions(NamedTuple):
    """What the policy needs of a decoded compactor state."""
    id: int
    compactor_epoch: int
    unfinished: int  # compactions submitted, scheduled, running or not yet committed
    outputs: frozenset[str] = frozenset()  # ULIDs of the SSTs completed ones wrote


class Decision(NamedTuple):
    """Move the torn file `move` aside and open, or refuse (and move nothing)."""
    move: int | None  # id of the torn manifest to move aside
    refuse: str | None  # why not opening (None: open)


def torn_problem(data: bytes, decode_error: str | None) -> str | None:
    """Why a manifest or compactions file (its whole content) is torn, or None if it is
    not torn by evidence. decode_error: SlateDB's error decoding it, None if it did."""
    if not data:
        return "empty"
    if len(data) < 2:
        return f"{len(data)} byte, shorter than its format version"
    version = struct.unpack_from(">H", data, 0)[0]
    if version == 0:
        return "format version 0: zeros, or cut short"
    if version in _VERSIONS and decode_error is not None:
        return f"does not decode ({decode_error})"
    return None  # intact, or a format this SlateDB does not know: left to SlateDB


def decide(newest: int, newest_problem: str | None, previous: Manifest | None,
           previous_problem: str | None, sst_problems: Mapping[str, str | None],
           wal: Sequence[wal_tail.WalObject], compactions: Compactions | None,
           present: frozenset[str] = frozenset()) -> Decision:
    """Open from the previous manifest, or refuse (see the module docstring).

    newest_problem: why the newest manifest is torn (None: not torn: nothing to do).
    previous: the manifest before it, decoded (None: absent or unreadable, with
    previous_problem). sst_problems: each SST previous references -> None if intact,
    else why not ("missing", a checksum). wal: every WAL object in `wal/`, checked.
    compactions: the newest compactor state, decoded (None: there is none). present:
    the ULIDs of the SSTs in `compacted/`."""
    if newest_problem is None:
        return Decision(None, None)
    if previous is None:
        return Decision(None, f"the previous manifest {previous_problem or 'is missing'}")
    if not previous.initialized or previous.clone:
        return Decision(None, "the previous manifest is uninitialized or of a clone "
                              "(not handled)")
    bad = sorted((u, p) for u, p in sst_problems.items() if p is not None)
    if bad:
        u, p = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return Decision(None, f"SST {COMPACTED_DIR}/{u}.sst of the previous manifest is "
                              f"{p}{more}")
    after = sorted(o.wal_id for o in wal if o.wal_id > previous.replay_after)
    want_to = max(after[-1] if after else previous.replay_after, previous.next_wal - 1)
    have = set(after)
    missing = [i for i in range(previous.replay_after + 1, want_to + 1) if i not in have]
    if missing:
        return Decision(None, f"WAL object {local_sync._wal_name(missing[0])} the previous "
                              "manifest needs is missing")
    p = wal_tail.plan(wal, previous.replay_after)
    if p.refuse is not None:
        return Decision(None, f"WAL object {local_sync._wal_name(p.refuse[0])} is torn "
                              f"before the intact {local_sync._wal_name(p.refuse[1])}")
    if compactions is not None and compactions.compactor_epoch > previous.compactor_epoch:
        return Decision(None, f"compactor state {_name(compactions.id, '.compactions')} has "
                              "compactor epoch "
                              f"{compactions.compactor_epoch}, the previous manifest "
                              f"{previous.compactor_epoch}")
    if compactions is not None and compactions.unfinished:
        return Decision(None, f"compactor state {_name(compactions.id, '.compactions')} has "
                              f"{compactions.unfinished}"
                              " compaction(s) not finished")
    # A compaction the compactor state calls completed whose output is on disk but not in
    # the previous manifest: committed by the torn one (or superseded, not yet collected).
    lost = sorted((compactions.outputs if compactions else frozenset())
                  & (present - set(previous.ssts)))
    if lost:
        return Decision(None, f"a completed compaction's output {COMPACTED_DIR}/{lost[0]}.sst"
                              " is not in the previous manifest")
    return Decision(newest, None)


def decide_compactions(newest: int, problem: str | None, previous: Compactions | None,
                       previous_problem: str | None, manifest_epoch: int | None) -> Decision:
    """Start the compactor from the compactor state before the torn newest one, or refuse.

    The compactor state records compactions and the compactor's epoch; the manifest
    SlateDB opens from is what a compaction's result is committed to. The previous state
    is a safe start if it has no compaction left unfinished (a compaction it calls
    running may be committed already, by what the torn state recorded) and its epoch is
    not above the manifest's (the compactor claims the manifest's epoch + 1). A lone torn
    first state (id 1: written empty at the compactor's first start) goes without one:
    SlateDB creates it anew. manifest_epoch: the compactor epoch of the manifest SlateDB
    opens from (None: no manifest)."""
    if problem is None:
        return Decision(None, None)
    if previous is None:
        if newest == 1 and previous_problem is None:
            return Decision(newest, None)
        return Decision(None, f"the previous compactor state {previous_problem or 'is missing'}")
    if previous.unfinished:
        return Decision(None, f"the previous compactor state has {previous.unfinished} "
                              "compaction(s) not finished")
    if manifest_epoch is not None and previous.compactor_epoch > manifest_epoch:
        return Decision(None, f"the previous compactor state has compactor epoch "
                              f"{previous.compactor_epoch}, the manifest {manifest_epoch}")
    return Decision(newest, None)


# ---- on disk -----------------------------------------------------------------------


def _ids(names: Sequence[str], suffix: str) -> list[int]:
    """The ids of `<20 digits><suffix>` names, ascending (temporary `…#n` files ignored)."""
    return sorted(int(n[:-len(suffix)]) for n in names
                  if n.endswith(suffix) and n[:-len(suffix)].isdigit())


def _name(i: int, suffix: str) -> str:
    return f"{i:020d}{suffix}"


def _listing(d: str, suffix: str) -> list[int]:
    try:
        return _ids(os.listdir(d), suffix)
    except FileNotFoundError:
        return []


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def _manifest(m) -> Manifest:  # noqa: ANN001 - slatedb's VersionedManifest
    """The policy's view of SlateDB's decoded manifest."""
    views = list(m.l0) + [v for r in m.compacted for v in r.sst_views]
    for seg in m.segments:
        views += list(seg.l0) + [v for r in seg.compacted for v in r.sst_views]
    return Manifest(m.id, m.replay_after_wal_id, m.next_wal_sst_id, m.compactor_epoch,
                    m.initialized, bool(m.external_dbs),
                    tuple(sorted({v.sst.id.value for v in views})))


def _sst_problem(path: str) -> str | None:
    try:
        data = _read(path)
    except FileNotFoundError:
        return "missing"
    return wal_tail.check_object(data) if data else "empty"


def move_aside(db_dir: str, sub: str, name: str, stamp: int) -> str:
    """Move `sub/name` into `torn/` as `<name>.<stamp>`, then fsync both directories, so
    the move is durable before SlateDB writes a new file with the same id."""
    torn_dir = os.path.join(db_dir, wal_tail.TORN_DIR)
    src_dir = os.path.join(db_dir, sub)
    os.makedirs(torn_dir, exist_ok=True)
    dest = os.path.join(torn_dir, f"{name}.{stamp}")
    os.rename(os.path.join(src_dir, name), dest)
    for d in (torn_dir, src_dir, db_dir):
        local_sync._fsync_path(d, local_sync._O_DIR)
    return dest


def _compactions_view(c) -> Compactions:  # noqa: ANN001 - slatedb's VersionedCompactions
    return Compactions(c.id, c.compactor_epoch,
                       sum(x.status in _UNFINISHED for x in c.recent_compactions),
                       frozenset(h.id.value for x in c.recent_compactions
                                 if x.status == CompactionStatus.COMPLETED
                                 for h in x.output_ssts))


class _Newest(NamedTuple):
    """The newest file of `manifest/` or `compactions/`, and the one before it."""
    id: int
    path: str
    problem: str | None  # why it is torn; None: it decodes (or is left to SlateDB)
    value: object  # SlateDB's decoding of it, when it decodes
    previous: object  # SlateDB's decoding of the one before it (None: missing, unreadable)
    previous_problem: str | None


async def _newest(db_dir: str, sub: str, suffix: str, read) -> _Newest | None:  # noqa: ANN001
    """Read the newest file of `sub` with `read` (SlateDB's decoder, by id); if it is torn,
    the one before it too. None: the directory has none."""
    ids = _listing(os.path.join(db_dir, sub), suffix)
    if not ids:
        return None
    path = os.path.join(db_dir, sub, _name(ids[-1], suffix))
    try:
        return _Newest(ids[-1], path, None, await read(ids[-1]), None, None)
    except Exception as e:  # noqa: BLE001 - classified here
        problem = torn_problem(_read(path), _first_line(e))
    previous, previous_problem = None, None
    if problem is not None and len(ids) > 1 and ids[-2] == ids[-1] - 1:
        try:
            previous = await read(ids[-2])
        except Exception as e:  # noqa: BLE001 - the refusal names it
            previous_problem = f"{_name(ids[-2], suffix)} is unreadable ({_first_line(e)})"
    return _Newest(ids[-1], path, problem, None, previous, previous_problem)


async def repair(db_dir: str, path: str, store: object, label: str) -> list[str]:
    """The whole step for one database directory: nothing if the newest manifest and
    compactor state decode; else move the torn one(s) aside (returns their new paths)
    or raise TornManifestError."""
    admin = AdminBuilder(path, store).build()
    man = await _newest(db_dir, MANIFEST_DIR, ".manifest", admin.read_manifest)
    comp = await _newest(db_dir, COMPACTIONS_DIR, ".compactions", admin.read_compactions)
    if (man is None or man.problem is None) and (comp is None or comp.problem is None):
        return []  # the usual case (or not torn by evidence: SlateDB's open says why)
    compactions = None  # the compactor state SlateDB will start from
    if comp is not None:
        c = comp.previous if comp.problem is not None else comp.value
        compactions = None if c is None else _compactions_view(c)
    moves: list[tuple[str, str, str]] = []  # (directory, name, why)
    previous = None
    if man is not None and man.problem is not None:
        previous = None if man.previous is None else _manifest(man.previous)

        def scan() -> tuple[dict[str, str | None], list[wal_tail.WalObject], frozenset[str]]:
            ssts = {u: _sst_problem(os.path.join(db_dir, COMPACTED_DIR, f"{u}.sst"))
                    for u in (previous.ssts if previous else ())}
            try:
                names = os.listdir(os.path.join(db_dir, COMPACTED_DIR))
            except FileNotFoundError:
                names = []
            present = frozenset(n[:-4] for n in names if n.endswith(".sst"))
            wal = wal_tail.scan(os.path.join(db_dir, local_sync.WAL_DIR),
                                previous.replay_after if previous else 0)
            return ssts, wal, present
        ssts, wal, present = await asyncio.get_running_loop().run_in_executor(None, scan)
        d = decide(man.id, man.problem, previous, man.previous_problem, ssts, wal,
                   compactions, present)
        if d.refuse is not None:
            raise TornManifestError(
                f"{label}: the newest manifest {man.path} is torn ({man.problem}) and "
                f"opening from the previous one is not provably safe: {d.refuse}; "
                "not opening")
        moves.append((MANIFEST_DIR, _name(man.id, ".manifest"), man.problem))
    if comp is not None and comp.problem is not None:
        epoch = (previous.compactor_epoch if previous is not None
                 else getattr(man.value if man else None, "compactor_epoch", None))
        d = decide_compactions(comp.id, comp.problem, compactions, comp.previous_problem,
                               epoch)
        if d.refuse is not None:
            raise TornManifestError(
                f"{label}: the newest compactor state {comp.path} is torn ({comp.problem}) "
                f"and starting from the previous one is not provably safe: {d.refuse}; "
                "not opening")
        moves.append((COMPACTIONS_DIR, _name(comp.id, ".compactions"), comp.problem))
    stamp = int(time.time() * 1000)
    moved = []
    for sub, name, why in moves:
        dest = await asyncio.get_running_loop().run_in_executor(
            None, move_aside, db_dir, sub, name, stamp)
        log.warning("%s: moved the torn newest %s to %s (%s); SlateDB starts from the "
                    "one before it", label, "manifest" if sub == MANIFEST_DIR
                    else "compactor state", dest, why)
        moved.append(dest)
    return moved


async def recover(store_url: str, name: str, path: str, store: object) -> list[str]:
    """Before SlateDB opens the database `name` (at `path` in `store`), and before
    wal_tail (which then checks the WAL from the manifest this leaves newest): the step
    above on a file:// store, nothing on any other. Raises TornManifestError."""
    where = local_sync.local_dir(store_url, name)
    if where is None or not os.path.isdir(os.path.join(where[0], MANIFEST_DIR)):
        return []
    return await repair(where[0], path, store, f"shard {name.removeprefix('shards/')}")
