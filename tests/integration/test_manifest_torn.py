"""A shard whose newest manifest a power loss tore: opened from the previous one, or refused.

A child process opens a real shard on a tmp directory (real SlateDB, the local store),
enqueues jobs one at a time (each acknowledged), flushes the memtable to an L0 SST
twice (so the newest manifest is an L0 flush's and the one before it another's), enqueues
more, and dies (os._exit). A second child reopens a copy of that and dies right after
its open (so the newest manifest there is the compactor's epoch bump). Each test copies
a directory, tears files the way an ext4 without a journal can after a power loss, and
opens the shard as the server does (`Shard.open`, so `open_database`).

What SlateDB 0.17 does alone (recorded by the `test_slatedb_alone_*` tests, which fail
if an upgrade changes it): a newest manifest empty: `Data error: empty manifest`; zeros:
`unsupported manifest format version … actual_version=0`; cut short: a flatbuffers
`RangeOutOfBounds`; a newest compactions file empty: `invalid compaction`, zeros:
`unsupported compactions format version … actual_version=0`. Moving a torn compactor
epoch bump aside by hand: the open fails, `detected newer DB client`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slatedb.uniffi import AdminBuilder, ObjectStore

from silo.shard import get_job
from silo.shard.state import Shard
from silo.storage import manifest_tail, wal_tail
from tests.integration.test_wal_torn import CFG, SHARD, _add, _zero

ROOT = Path(__file__).resolve().parents[2]

_WRITER = """
import asyncio, json, os, sys
from slatedb.uniffi import FlushOptions, FlushType
from tests.integration.test_wal_torn import CFG, SHARD, _add
from silo.shard.state import Shard, ShardConfig
from silo.storage import admin

FAST = {"compactor_options.poll_interval": "50ms",
        "compactor_options.worker.compactions_poll_interval": "50ms"}

async def main(root, flushes, tag):
    cfg = ShardConfig(flush_on_commit=True, flush_interval_ms=10, slatedb=FAST) if tag == "c" else CFG
    s = await Shard.open(SHARD, "", "", f"file://{root}", cfg)
    acked = []
    for k in range(flushes + 1):
        if k:
            await s.db.flush_with_options(FlushOptions(flush_type=FlushType.MEM_TABLE))
        acked += [await _add(s, f"job-{tag}{k}-{i}") for i in range(5)]  # each acknowledged
    c = os.path.join(root, "shards", SHARD, "compactions")
    if tag == "c":  # one full compaction, committed to the manifest
        await s.db.flush_with_options(FlushOptions(flush_type=FlushType.MEM_TABLE))
        await admin.submit_full_compaction(f"file://{root}", SHARD)
        for _ in range(400):
            if (await admin.storage_info(f"file://{root}", SHARD)).l0_sst_count == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("compaction did not finish")
        tag = "3"
    for _ in range(200):  # the open's compactor epoch bump reached the compactions file
        if len([n for n in os.listdir(c) if n.endswith(".compactions")]) >= 2 * int(tag or 1):
            break
        await asyncio.sleep(0.05)
    print(json.dumps(acked), flush=True)
    os._exit(0)  # killed: no close

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def _db(root: Path) -> Path:
    return root / "shards" / SHARD


def _ids(root: Path, sub: str, suffix: str) -> list[int]:
    return manifest_tail._ids(os.listdir(_db(root) / sub), suffix)


def _manifest(root: Path, i: int | None = None) -> Path:
    i = _ids(root, "manifest", ".manifest")[-1] if i is None else i
    return _db(root) / "manifest" / f"{i:020d}.manifest"


def _run(root: Path, flushes: int, tag: str = "") -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _WRITER, str(root), str(flushes), tag],
                         cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """"flushed": newest manifest an L0 flush's; "reopened": a copy opened again and
    killed, newest manifest the compactor's epoch bump."""
    d = tmp_path_factory.mktemp("mtorn")
    flushed = d / "flushed"
    acked = _run(flushed, 2)
    reopened = d / "reopened"
    shutil.copytree(flushed, reopened)
    acked2 = _run(reopened, 0, "2")
    compacted = d / "compacted"
    acked3 = _run(compacted, 2, "c")
    return {"flushed": (flushed, acked), "reopened": (reopened, acked + acked2),
            "compacted": (compacted, acked3)}


def _copy(bases, which: str, tmp_path: Path) -> tuple[Path, list[str]]:
    src, acked = bases[which]
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst, acked


@pytest.fixture
def flushed(bases, tmp_path) -> tuple[Path, list[str]]:
    return _copy(bases, "flushed", tmp_path)


@pytest.fixture
def reopened(bases, tmp_path) -> tuple[Path, list[str]]:
    return _copy(bases, "reopened", tmp_path)


@pytest.fixture
def compacted(bases, tmp_path) -> tuple[Path, list[str]]:
    return _copy(bases, "compacted", tmp_path)


def _tear(p: Path, how: str) -> None:
    if how == "empty":
        os.truncate(p, 0)
    elif how == "zeros":
        _zero(p)
    else:  # cut: the first part of the data reached the disk
        os.truncate(p, p.stat().st_size // 2)


async def _open(root: Path) -> Shard:
    return await Shard.open(SHARD, "", "", f"file://{root}", CFG)


def _check(root: Path, acked: list[str]) -> None:
    """Open: every acknowledged job is there; write one more, close, open again."""
    async def main() -> None:
        s = await _open(root)
        try:
            for jid in acked:
                assert (await get_job.get_job(s, "-", jid, False)).info is not None, jid
            await _add(s, "after")
        finally:
            await s.close()
        s = await _open(root)
        try:
            for jid in [*acked, "after"]:
                assert (await get_job.get_job(s, "-", jid, False)).info is not None, jid
        finally:
            await s.close()
    asyncio.run(main())


def _torn(root: Path) -> list[str]:
    d = _db(root) / wal_tail.TORN_DIR
    return sorted(os.listdir(d)) if d.exists() else []


def _without_repair(monkeypatch) -> None:
    async def nothing(*_a, **_k) -> None:
        return None
    monkeypatch.setattr(manifest_tail, "recover", nothing)


_SLATEDB_SAYS = {"empty": "empty manifest",
                 "zeros": "unsupported manifest format version.*actual_version=`0`",
                 "cut": "RangeOutOfBounds"}


@pytest.mark.parametrize("how", sorted(_SLATEDB_SAYS))
def test_slatedb_alone_refuses_a_torn_newest_manifest(flushed, how, monkeypatch) -> None:
    """The reason for silo.storage.manifest_tail; when an upgrade changes it, this fails."""
    root, _ = flushed
    _tear(_manifest(root), how)
    _without_repair(monkeypatch)
    with pytest.raises(Exception, match=_SLATEDB_SAYS[how]):
        asyncio.run(_open(root))


@pytest.mark.parametrize("how,says", [
    ("empty", "invalid compaction"),
    ("zeros", "unsupported compactions format version.*actual_version=`0`")])
def test_slatedb_alone_refuses_a_torn_compactions_file(flushed, how, says,
                                                       monkeypatch) -> None:
    root, _ = flushed
    newest = _ids(root, "compactions", ".compactions")[-1]
    _tear(_db(root) / "compactions" / f"{newest:020d}.compactions", how)
    _without_repair(monkeypatch)
    with pytest.raises(Exception, match=says):
        asyncio.run(_open(root))


def test_slatedb_alone_fenced_after_a_torn_compactor_epoch_bump(reopened,
                                                                monkeypatch) -> None:
    """Why a compactor state newer than the previous manifest is refused: opened from the
    manifest before the compactor's epoch bump, SlateDB's compactor is fenced."""
    root, _ = reopened
    p = _manifest(root)
    (_db(root) / "torn").mkdir()
    p.rename(_db(root) / "torn" / p.name)
    _without_repair(monkeypatch)

    async def main() -> None:
        s = await _open(root)  # measured: the open itself fails (the compactor starts in it)
        try:
            await _add(s, "x")
        finally:
            await s.close()
    with pytest.raises(Exception, match="detected newer DB client"):
        asyncio.run(main())


@pytest.mark.parametrize("how", sorted(_SLATEDB_SAYS))
def test_torn_newest_manifest_opens_from_the_previous(flushed, how, caplog) -> None:
    root, acked = flushed
    p = _manifest(root)
    _tear(p, how)
    torn_bytes = p.read_bytes()
    with caplog.at_level("WARNING", logger="silo.storage.manifest_tail"):
        _check(root, acked)
    [moved] = _torn(root)
    assert moved.startswith(p.name + ".")
    assert (_db(root) / "torn" / moved).read_bytes() == torn_bytes
    [line] = [r.getMessage() for r in caplog.records if "torn newest manifest" in r.getMessage()]
    assert f"shard {SHARD}" in line and p.name in line


def _refused(root: Path, *names: str) -> str:
    before = sorted(os.listdir(_db(root) / "manifest"))
    with pytest.raises(manifest_tail.TornManifestError) as e:
        asyncio.run(_open(root))
    msg = str(e.value)
    assert "\n" not in msg and f"shard {SHARD}" in msg, msg
    for n in names:
        assert n in msg, msg
    assert sorted(os.listdir(_db(root) / "manifest")) == before and _torn(root) == []
    return msg


def _previous_ssts(root: Path) -> list[Path]:
    return sorted((_db(root) / "compacted").glob("*.sst"))[:1]  # the first L0 flush's


def test_refused_when_an_sst_of_the_previous_manifest_is_gone(flushed) -> None:
    """The garbage collector may delete SSTs a torn compaction manifest replaced."""
    root, _ = flushed
    _zero(_manifest(root))
    [sst] = _previous_ssts(root)
    sst.unlink()
    _refused(root, _manifest(root).name, sst.name, "missing")


def test_refused_when_an_sst_of_the_previous_manifest_is_torn(flushed) -> None:
    root, _ = flushed
    _zero(_manifest(root))
    [sst] = _previous_ssts(root)
    _zero(sst)
    _refused(root, sst.name)


def test_refused_when_a_wal_object_the_previous_manifest_needs_is_gone(flushed) -> None:
    """The garbage collector deletes WAL objects below the torn manifest's boundary; the
    previous manifest needs them."""
    root, _ = flushed
    newest = _ids(root, "manifest", ".manifest")[-1]

    async def replay_after() -> int:
        admin = AdminBuilder(str(_db(root)).lstrip("/"), ObjectStore.resolve("file:///"))
        return (await admin.build().read_manifest(newest - 1)).replay_after_wal_id
    boundary = asyncio.run(replay_after())
    _zero(_manifest(root))
    wal = _db(root) / "wal"
    first_needed = [i for i in _ids(root, "wal", ".sst") if i > boundary][0]
    (wal / f"{first_needed:020d}.sst").unlink()
    _refused(root, f"{first_needed:020d}.sst", "missing")


def test_refused_when_two_manifests_are_torn(flushed) -> None:
    root, _ = flushed
    newest = _ids(root, "manifest", ".manifest")[-1]
    _zero(_manifest(root))
    _zero(_manifest(root, newest - 1))
    _refused(root, f"{newest - 1:020d}.manifest")


def test_refused_after_a_torn_compactor_epoch_bump(reopened) -> None:
    root, _ = reopened
    _zero(_manifest(root))
    _refused(root, _manifest(root).name, "compactor epoch")


@pytest.mark.parametrize("how", ["empty", "zeros"])
def test_torn_compactions_file_starts_from_the_previous(flushed, how, caplog) -> None:
    root, acked = flushed
    newest = _ids(root, "compactions", ".compactions")[-1]
    name = f"{newest:020d}.compactions"
    _tear(_db(root) / "compactions" / name, how)
    with caplog.at_level("WARNING", logger="silo.storage.manifest_tail"):
        _check(root, acked)
    [moved] = _torn(root)
    assert moved.startswith(name + ".")
    [line] = [r.getMessage() for r in caplog.records if "compactor state" in r.getMessage()]
    assert f"shard {SHARD}" in line and name in line


def test_torn_compactions_file_after_a_reopen(reopened) -> None:
    """After an open's compactor epoch bump (manifest and compactor state at epoch 2): the
    state before the torn one has epoch 2 too, the compactor claims 3; every job is there."""
    root, acked = reopened
    newest = _ids(root, "compactions", ".compactions")[-1]
    _zero(_db(root) / "compactions" / f"{newest:020d}.compactions")
    _check(root, acked)
    assert len(_torn(root)) == 1


def test_two_torn_compactions_files_are_refused_in_one_line(flushed) -> None:
    root, _ = flushed
    newest = _ids(root, "compactions", ".compactions")[-1]
    for i in (newest, newest - 1):
        _zero(_db(root) / "compactions" / f"{i:020d}.compactions")
    _refused(root, f"{newest:020d}.compactions", f"{newest - 1:020d}.compactions")



def test_intact_store_untouched(flushed) -> None:
    root, acked = flushed
    _check(root, acked)
    assert _torn(root) == []


def test_refused_after_a_torn_compaction_result(compacted) -> None:
    """The newest manifest committed a compaction the compactor state calls completed:
    what SlateDB's compactor makes of that from the previous manifest is not known here,
    so it is refused."""
    root, _ = compacted
    _zero(_manifest(root))
    _refused(root, _manifest(root).name, "completed compaction")


def _serve_and_kill(data_dir: Path, env: dict[str, str]) -> list[str]:
    from tests.integration.harness import Server  # noqa: PLC0415 - only these tests

    with Server(data_dir, "--shards", "1", env=env) as srv:
        c = srv.client()
        ids = [c.enqueue(task_group="t") for _ in range(20)]
        srv.kill()
        c.channel.close()
    return ids


def _newest_manifest(data_dir: Path) -> Path:
    [man] = list(data_dir.rglob("manifest"))
    return man / f"{manifest_tail._ids(os.listdir(man), '.manifest')[-1]:020d}.manifest"


# Without the compactor an open writes only the writer's epoch bump, so after the kill the
# newest manifest is one the fallback can take (with it, the compactor's bump: refused).
NO_COMPACTOR = {"SILO_COMPACTOR_POLL_INTERVAL_MS": "0"}


def test_server_restarts_after_a_torn_newest_manifest(tmp_path) -> None:
    """End to end: `silo serve` killed after acknowledging jobs, its newest manifest then
    zeroed (data never on disk). SlateDB 0.17 alone refused it and the supervisor gave
    up; now the server starts, says so in one warning line, and has every job."""
    from tests.integration.harness import Server  # noqa: PLC0415 - only this test

    data_dir = tmp_path / "d"
    ids = _serve_and_kill(data_dir, NO_COMPACTOR)
    newest = _newest_manifest(data_dir)
    _zero(newest)
    with Server(data_dir, "--shards", "1", env=NO_COMPACTOR) as srv:
        c = srv.client()
        assert all(c.get(j).id == j for j in ids)
        c.channel.close()
        warned = [line for line in srv.log if "torn newest manifest" in line]
        assert len(warned) == 1 and newest.name in warned[0]


def test_server_refuses_a_torn_store_in_one_line_exit_2(tmp_path, monkeypatch) -> None:
    """Two manifests torn: not provably safe. `silo serve` exits 2 with `silo: …` after the
    worker's one error line naming the shard and the file, and no traceback."""
    from tests.integration.test_runtime_faults import serve_fails  # noqa: PLC0415

    data_dir = tmp_path / "d"
    _serve_and_kill(data_dir, NO_COMPACTOR)
    newest = _newest_manifest(data_dir)
    _zero(newest)
    _zero(newest.with_name(f"{int(newest.name.split('.')[0]) - 1:020d}.manifest"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # serve_fails runs from tmp_path
    r = serve_fails(tmp_path, "--data-dir", str(data_dir), "--grpc-addr", "127.0.0.1:0",
                    "--shards", "1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("silo: no worker could start")
    [line] = [x for x in r.stderr.splitlines() if "worker 0 failed" in x]
    assert newest.name in line and "shard " in line
