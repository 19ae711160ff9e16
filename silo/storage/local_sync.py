"""fsync for SlateDB's local directory store: an acknowledged write survives a power loss.

SlateDB 0.17 writes every object of the local store (`object_store`'s LocalFileSystem,
the default `file://` store) as a temporary `<name>#<n>` file that is then linked
(`wal/`, `manifest/`, `compactions/`: create-if-absent) or renamed (`compacted/` SSTs)
into place, and deletes garbage with `unlink`; it never calls fsync, and the bindings
refuse the store's own `fsync` setting (`ObjectStoreBuilder.with_config("fsync", …)` is
"invalid Local object store config key"). A WAL flush returning therefore means the
write is in the page cache: a killed process loses nothing, a crashed kernel or a power
loss may lose it.

What this module adds (`storage.local_fsync`, on by default; file:// stores only):

* **The ack path.** After a commit's WAL flush returns and before any of its waiters is
  resolved, `GroupCommitter` hands its batches to `LocalSync.then_sync`: off the event
  loop (a C thread or the fsync pool, "Where a round runs") every WAL object newer than
  the last one synced is fsynced, then the `wal/` directory. WAL objects are named by a 20-digit id
  that SlateDB increments by one per flush (`wal/00000000000000000042.sst`), so the new
  ones are found by opening `next`, `next+1`, … until one is missing (a miss costs ~1 µs;
  listing a `wal/` of 4,096 objects cost ~1.1 ms here). A round that wrote something and
  found no new object lists the directory once instead, so a gap in the ids cannot hide
  one. One round covers every flush that returned while the previous round ran, at most
  one per shard at a time (`then_sync`). The committer does not wait for a round before
  writing and flushing the next commit: a round takes as long as a write + flush or
  longer (two fsyncs), so waiting doubled the time from one commit to the next. But it
  writes only one commit ahead: while a flush waits for the next round (`backlog`), the
  committer counts it as a commit in flight, and new writes gather until that round
  starts (`on_room`). Without that bound, under load the committer wrote a WAL object
  per few operations while a round ran, and a round fsyncs each object on its own:
  rounds of 20 objects took ~50 ms, each commit waited ~100 ms, and h2load Enqueue fell
  to ~2.5 operations per commit. A round that finds a later flush's object already
  there syncs it too; the round covering that flush then does not list (`_ahead`).
* **Where a round runs.** With the C module built (`_walsync`, `NATIVE`), the probe and
  fsyncs of a round are one job on one of its two pthreads, which never take the GIL; the
  result comes back through an eventfd the loop watches (silo.storage.wal_rounds), and the
  waiters are answered from that callback (no task, no executor future, no self-pipe).
  The round's `wal/` fsync runs on the other C thread while the files are fsynced, once
  every object it covers was opened (`OVERLAP`; the two then share one device flush).
  In the pool instead, the round's five syscalls each passed the GIL back and forth with
  the loop, and run_in_executor cost the loop ~40 µs per round. The pool path remains for
  builds without the module and while a test records through the `fsync` seam. The
  listing after a gap always runs in the pool.
* **Open.** `prepare` notes the newest WAL id before SlateDB opens the database; `attach`
  then syncs what the open wrote (the fencing WAL object, any replayed flush) and the
  directories from the WAL's up to the store root, which a first open creates.
* **Everything else** (L0 and compacted SSTs, manifests, compactor state, garbage
  collector deletions) is written by SlateDB's own threads, which cannot be ordered from
  outside. A background thread walks each open database's directories except `wal/`
  every `BACKGROUND_INTERVAL_S` and fsyncs every file it has not synced yet, then every
  directory whose entries changed; the first pass after an open syncs every such file
  once (covering what a crashed predecessor left unsynced). `final_pass` (at a worker's
  stop, after its shards closed) runs one more pass, so the L0 SST and manifest a close
  writes are durable before the process exits.

Residual window: a background file is on disk at the latest one pass after it was
written (≤ BACKGROUND_INTERVAL_S + the pass), or earlier by the kernel's own writeback.
A power loss inside that window right after an L0 flush may lose the new SST or
manifest; an acknowledged job is lost only if, in the same window, the garbage collector's
deletion of the WAL objects that SST replaced reached the disk before the SST did (SlateDB
deletes WAL objects only once a manifest naming that SST is written, and only when they
are older than `storage.gc_min_age_s`).

An fsync error fails the commit's waiters exactly as a failed WAL flush does (the
committer's durability-wait error path: nothing is acknowledged, the shard's storage is
marked failed). An error in a background pass is kept and raised by the next commit's
round, so it fails the shard the same way (after an fsync error Linux may already have
dropped the unwritten pages, so a retried fsync proves nothing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote, urlparse

from silo.observability import metrics
from silo.storage import wal_rounds

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["ENABLED", "LocalSync", "attach", "configure", "final_pass", "of", "prepare"]

# storage.local_fsync of this process: silo.runtime.worker sets it before opening shards.
ENABLED = True
BACKGROUND_INTERVAL_S = 1.0
PASSES_ENABLED = True  # False: the background thread skips its passes (tests run them)
POOL_THREADS = 2  # rounds of different shards of one process may overlap
NATIVE = True  # rounds on _walsync's C threads when it is built (False: the pool's)
OVERLAP = True  # C rounds fsync wal/ on the other thread while the files are fsynced
WAL_DIR = "wal"
_WAL_SUFFIX = ".sst"
_WAL_DIGITS = 20
_O_FILE = os.O_RDONLY | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0)


def fsync(fd: int, path: str) -> None:
    """fsync one open file or directory (`path` names it). The seam tests record through
    (module attribute, looked up at each call)."""
    os.fsync(fd)


_OS_FSYNC = fsync  # the seam untouched: rounds may run in C (a test's recorder: Python)


def _fsync_path(path: str, flags: int = _O_FILE) -> None:
    fd = os.open(path, flags)
    try:
        fsync(fd, path)
    finally:
        os.close(fd)


def _fsync_in(dir_fd: int, dir_path: str, name: str) -> bool:
    """fsync the file `name` of the open directory; False if it does not exist."""
    try:
        fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        fsync(fd, os.path.join(dir_path, name))
    finally:
        os.close(fd)
    return True


def _wal_name(wal_id: int) -> str:
    return f"{wal_id:0{_WAL_DIGITS}d}{_WAL_SUFFIX}"


def _wal_ids(names: list[str]) -> list[int]:
    """The ids of the finished WAL objects among `names` (temporaries carry a `#`)."""
    n = len(_WAL_SUFFIX)
    return sorted(int(name[:-n]) for name in names
                  if name.endswith(_WAL_SUFFIX) and name[:-n].isdigit())


class LocalSync:
    """fsyncs one database's files on the local store (see the module docstring)."""

    def __init__(self, db_dir: str, store_root: str) -> None:
        self.db_dir = db_dir
        self.store_root = store_root  # the file:// store's directory
        self.wal_dir = os.path.join(db_dir, WAL_DIR)
        self._wal_fd: int | None = None  # kept open: names are opened relative to it
        self._next_wal = 1  # the lowest WAL id not yet synced
        self._wal_lock = threading.Lock()
        self._bg_lock = threading.Lock()
        # background: directory path -> the entries synced there (files and subdirs)
        self._synced: dict[str, frozenset[str]] = {}
        self._error: OSError | None = None  # from a background pass: fails the next round
        self.closed = False
        # Objects a round synced beyond its own flush's one (the next commit's, flushed
        # while it ran): that many later rounds may find nothing new without listing.
        self._ahead = 0
        self._chain: asyncio.Future[None] | None = None  # the task running rounds
        self._waiting: list = []  # (batches, done) whose flush returned, for the next round
        # Called when a round takes the waiting flushes (the committer's `_kick`): the
        # one commit it holds back while `backlog` may go now.
        self.on_room: Callable[[], None] | None = None
        # A round on _walsync's threads: (group, flushes, shard) until its result is in.
        self._native_round: tuple[list, int, str] | None = None
        self._idle: list[asyncio.Future[None]] = []  # drain()s waiting for that round

    # ---- the ack path (runs in the fsync pool) ----------------------------------

    def note_existing(self) -> None:
        """Before SlateDB opens the database: what is in `wal/` now is not the open's."""
        try:
            ids = _wal_ids(os.listdir(self.wal_dir))
        except FileNotFoundError:
            ids = []
        self._next_wal = ids[-1] + 1 if ids else 1

    def sync_opened(self) -> None:
        """After the open: its WAL objects, then every directory from the database's up
        to the store's parent (a first open may have created all of them)."""
        self.sync_wal(0)
        d = self.db_dir
        stop = os.path.dirname(self.store_root)
        while True:
            _fsync_path(d, _O_DIR)
            parent = os.path.dirname(d)
            if d == stop or parent == d:
                break
            d = parent

    def sync_wal(self, flushes: int) -> float:
        """fsync every WAL object newer than the last synced, then `wal/`; returns the
        seconds it took. `flushes`: how many of the round's flushes carried writes (one
        object each); finding fewer new objects than that, and no earlier round having
        synced the missing ones ahead (`_ahead`), means a gap in the ids: list."""
        t0 = time.perf_counter()
        with self._wal_lock:
            if self._error is not None:
                raise OSError(self._error.errno, f"earlier fsync failed: {self._error}")
            try:
                self._sync_wal(flushes)
            except OSError as e:
                self._error = e
                raise
        return time.perf_counter() - t0

    def _sync_wal(self, flushes: int) -> None:
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self.wal_dir, _O_DIR)
            except FileNotFoundError:
                return  # nothing flushed yet
        wal_fd = self._wal_fd
        n = self._next_wal
        start = n
        while _fsync_in(wal_fd, self.wal_dir, _wal_name(n)):
            n += 1
        if n != start:
            fsync(wal_fd, self.wal_dir)
            self._next_wal = n
        if self._must_list(flushes, start, n):
            self._list_missing(wal_fd)

    def _must_list(self, flushes: int, start: int, n: int) -> bool:
        """After probing `start`..`n-1` for a round of `flushes` writing flushes: True
        if their objects are neither found nor synced ahead by an earlier round."""
        missing = flushes - (n - start)
        if flushes and missing < 0:  # a later flush's object, found while we probed
            self._ahead -= missing
        elif missing > 0 and self._ahead >= missing:
            self._ahead -= missing  # earlier rounds synced these flushes' objects
        elif missing > 0 and n == start:
            self._ahead = 0
            return True
        return False

    def _list_missing(self, wal_fd: int) -> None:
        """A gap in the ids: fsync every object past it that the listing shows, then
        `wal/` if there was any."""
        n = start = self._next_wal
        for wal_id in _wal_ids(os.listdir(wal_fd)):
            if wal_id >= n and _fsync_in(wal_fd, self.wal_dir, _wal_name(wal_id)):
                n = wal_id + 1
        if n != start:
            fsync(wal_fd, self.wal_dir)
            self._next_wal = n

    def _listing_round(self) -> float:
        """The listing, for a C round that found nothing (in the pool, rare)."""
        t0 = time.perf_counter()
        with self._wal_lock:
            if self._error is not None:
                raise OSError(self._error.errno, f"earlier fsync failed: {self._error}")
            try:
                if self._wal_fd is not None:
                    self._list_missing(self._wal_fd)
            except OSError as e:
                self._error = e
                raise
        return time.perf_counter() - t0

    async def after_flush(self, batches: list, shard: str, flushes: int = 1) -> None:
        """The commit path's step (GroupCommitter, once the flushes covering `batches`
        returned): the round in the fsync pool; raises what the fsync raised."""
        wrote = flushes if any(b.writes for b in batches) else 0
        loop = asyncio.get_running_loop()
        spent = await loop.run_in_executor(_pool(), self.sync_wal, wrote)
        self._spent(shard, spent)

    def _spent(self, shard: str, seconds: float) -> None:
        """A round's time (in the pool or on a C thread): the histogram's one place."""
        metrics.LOCAL_FSYNC.observe((shard,), seconds)

    def then_sync(self, batches: list, shard: str,
                  done: Callable[[list, BaseException | None], None]) -> None:
        """Have a round cover `batches`, whose flush returned, then call done(batches,
        None or the error). It does not wait: the next commit is written and flushed
        meanwhile. One round at a time: flushes that return during a round gather for
        the next one, which covers them all (group commit, one level down)."""
        self._waiting.append((batches, done))
        if self._chain is None and self._native_round is None:
            self._next_round(shard)

    def _next_round(self, shard: str) -> None:
        """Start the round covering `_waiting`: in C when it can, else the pool's task."""
        rounds = _native_rounds() if self._wal_fd is not None and not self.closed else None
        if rounds is not None:
            self._start_native(rounds, shard)
        else:
            self._chain = asyncio.ensure_future(self._rounds(shard))

    @property
    def backlog(self) -> bool:
        """A flush has returned and waits for a round that has not started: the committer
        writes no further commit until it starts (see the module docstring)."""
        return bool(self._waiting)

    # ---- the same rounds on _walsync's C threads (no task, no executor future) ------

    def _start_native(self, rounds: wal_rounds.NativeRounds, shard: str) -> None:
        group, self._waiting = self._waiting, []
        if self.on_room is not None:
            self.on_room()
        flushes = len(group) if any(b.writes for bs, _ in group for b in bs) else 0
        self._native_round = (group, flushes, shard)
        with self._wal_lock:
            err = self._error
        if err is not None:  # as sync_wal: a kept error fails the round without trying
            self._end_native(OSError(err.errno, f"earlier fsync failed: {err}"))
            return
        rounds.submit(self, self._wal_fd, self._next_wal)  # type: ignore[arg-type]

    def native_done(self, next_id: int, err: int, ns: int) -> None:
        """A C round's result (on the loop, from wal_rounds.NativeRounds.drain)."""
        assert self._native_round is not None
        _, flushes, shard = self._native_round
        self._spent(shard, ns / 1e9)
        if err:
            e = OSError(err, os.strerror(err))
            with self._wal_lock:
                if self._error is None:
                    self._error = e
            self._end_native(e)
            return
        start, self._next_wal = self._next_wal, next_id
        if not self._must_list(flushes, start, next_id):
            self._end_native(None)
            return
        fut = asyncio.get_running_loop().run_in_executor(_pool(), self._listing_round)
        fut.add_done_callback(self._listed)

    def _listed(self, fut: asyncio.Future[float]) -> None:
        assert self._native_round is not None
        e = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if e is None:
            self._spent(self._native_round[2], fut.result())
        self._end_native(e)

    def _end_native(self, err: BaseException | None) -> None:
        """Answer the round's group; the next round (the flushes that returned
        meanwhile) is submitted first, so its fsyncs start before these answers."""
        assert self._native_round is not None
        group, _, shard = self._native_round
        self._native_round = None
        if self.closed and self._wal_fd is not None:  # close() left it to this round
            self.close()
        if self._waiting:
            self._next_round(shard)
        for bs, done in group:
            done(bs, err)
        if self._native_round is None and self._chain is None:
            idle, self._idle = self._idle, []
            for f in idle:
                if not f.done():
                    f.set_result(None)

    async def _rounds(self, shard: str) -> None:
        group: list = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                if self.on_room is not None:
                    self.on_room()
                err: BaseException | None = None
                try:
                    await self.after_flush([b for bs, _ in group for b in bs], shard,
                                           flushes=len(group))
                except Exception as e:  # noqa: BLE001 - to the waiters, like a failed flush
                    err = e
                for bs, done in group:
                    done(bs, err)
                group = []
        except asyncio.CancelledError as e:  # the loop is going away: the waiters fail
            for bs, done in group + self._waiting:
                done(bs, e)
            self._waiting = []
            raise
        finally:
            self._chain = None

    async def drain(self) -> None:
        """Until every round started so far has ended (the committer's close)."""
        while self._chain is not None or self._native_round is not None:
            if self._chain is not None:
                await asyncio.wait([self._chain])
            else:
                f = asyncio.get_running_loop().create_future()
                self._idle.append(f)
                await f

    # ---- background files (runs in the background thread) ------------------------

    def sync_background(self) -> None:
        """fsync every file under the database's directory (except `wal/`) not synced
        yet, then each directory whose entries changed. Errors are kept (`_error`)."""
        with self._bg_lock:
            try:
                self._sync_tree()
            except FileNotFoundError:
                pass  # the database's directory went away (a test's tmp dir, a wipe)
            except OSError as e:
                with self._wal_lock:
                    if self._error is None:
                        self._error = e
                log.error("fsync of %s failed: %s", self.db_dir, e)

    def _sync_tree(self) -> None:
        changed: list[str] = []
        for top, dirs, files in os.walk(self.db_dir):
            if top == self.db_dir and WAL_DIR in dirs:
                dirs.remove(WAL_DIR)
                entries = frozenset([WAL_DIR, *dirs, *files])
            else:
                entries = frozenset([*dirs, *files])
            entries = frozenset(e for e in entries if "#" not in e)  # uploads in progress
            before = self._synced.get(top, frozenset())
            file_names = set(files)
            for name in sorted(entries - before):
                if name in file_names:
                    path = os.path.join(top, name)
                    try:
                        _fsync_path(path)
                    except FileNotFoundError:  # deleted meanwhile (GC)
                        entries = entries - {name}
            if entries != before:
                changed.append(top)
            self._synced[top] = entries
        # Deepest first, so a new directory's own entry is synced after its contents.
        for top in sorted(changed, key=len, reverse=True):
            try:
                _fsync_path(top, _O_DIR)
            except FileNotFoundError:
                self._synced.pop(top, None)

    def close(self) -> None:
        """Close `wal/`'s fd, or mark it for closing: a C round in flight still uses it
        (its number could be reused meanwhile), and closes it when it ends."""
        with self._wal_lock:
            self.closed = True
            if self._wal_fd is not None and self._native_round is None:
                os.close(self._wal_fd)
                self._wal_fd = None


# ---- the process's syncers, pool and background thread --------------------------

_by_db: weakref.WeakKeyDictionary[object, LocalSync] = weakref.WeakKeyDictionary()
_open: dict[str, LocalSync] = {}  # db_dir -> its syncer, until final_pass
_state: dict[str, object] = {"pool": None, "thread": None}
_state_lock = threading.Lock()
_stop = threading.Event()


def configure(enabled: bool) -> None:
    """storage.local_fsync for the databases this process opens from now on."""
    global ENABLED  # noqa: PLW0603 - a process-wide setting, set once at start-up
    ENABLED = enabled


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    pool = _state["pool"]
    if pool is None:
        with _state_lock:
            pool = _state["pool"]
            if pool is None:
                pool = _state["pool"] = concurrent.futures.ThreadPoolExecutor(
                    POOL_THREADS, thread_name_prefix="silo-fsync")
    return pool  # type: ignore[return-value]


_natives: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, wal_rounds.NativeRounds] = (
    weakref.WeakKeyDictionary())


def _native_rounds() -> wal_rounds.NativeRounds | None:
    """The running loop's C rounds; None without the C module, with NATIVE off, or while
    a test records through the `fsync` seam (that path is Python's)."""
    if not wal_rounds.AVAILABLE or not NATIVE or fsync is not _OS_FSYNC:
        return None
    loop = asyncio.get_running_loop()
    r = _natives.get(loop)
    if r is None:
        r = _natives[loop] = wal_rounds.NativeRounds(loop, overlap=OVERLAP)
    return r


def _background_loop() -> None:
    while not _stop.wait(BACKGROUND_INTERVAL_S):
        for s in list(_open.values()):
            if PASSES_ENABLED and not s.closed:
                s.sync_background()


def _start_background() -> None:
    with _state_lock:
        if _state["thread"] is None:
            t = threading.Thread(target=_background_loop, name="silo-fsync-bg", daemon=True)
            _state["thread"] = t
            t.start()


def _after_fork_in_child() -> None:
    """Threads do not survive fork: a child starts its own pool and thread when needed
    (and a lock another thread held at the fork would stay held)."""
    global _state_lock  # noqa: PLW0603
    _state_lock = threading.Lock()
    _state["pool"] = None
    _state["thread"] = None
    _open.clear()
    _by_db.clear()
    _natives.clear()  # the parent's C objects are inert here (_walsync.c)


os.register_at_fork(after_in_child=_after_fork_in_child)


def local_dir(store_url: str, name: str) -> tuple[str, str] | None:
    """(database directory, store directory) for a file:// store URL, else None."""
    u = urlparse(store_url)
    if u.scheme != "file":
        return None
    root = os.path.abspath(unquote(u.path) or "/")
    return os.path.normpath(os.path.join(root, name)), root


async def prepare(store_url: str, name: str) -> LocalSync | None:
    """A syncer for the database `name` of the store, made before SlateDB opens it;
    None when the store is not local or storage.local_fsync is off."""
    where = local_dir(store_url, name) if ENABLED else None
    if where is None:
        return None
    s = LocalSync(*where)
    await asyncio.get_running_loop().run_in_executor(_pool(), s.note_existing)
    return s


async def attach(db: T, s: LocalSync | None) -> T:
    """After the open (s from `prepare`, or None): sync what it wrote, then serve db's
    commits (`of`) and its background files. Returns db."""
    if s is None:
        return db
    await asyncio.get_running_loop().run_in_executor(_pool(), s.sync_opened)
    _by_db[db] = s
    old = _open.pop(s.db_dir, None)
    if old is not None:
        old.close()
    _open[s.db_dir] = s
    _start_background()
    return db


def of(db: object) -> LocalSync | None:
    """The syncer of a database opened by silo.storage.database.open_database, if any."""
    try:
        return _by_db.get(db)
    except TypeError:  # not weakly referenceable (a test's fake database)
        return None


async def final_pass(dbs: list[object]) -> None:
    """Once these databases are shut down: sync their remaining background files (the
    L0 SST and manifest a close writes) and forget them."""
    loop = asyncio.get_running_loop()
    for db in dbs:
        s = of(db)
        if s is None or _open.get(s.db_dir) is not s:
            continue
        del _open[s.db_dir]
        await loop.run_in_executor(_pool(), s.sync_background)
        s.close()
