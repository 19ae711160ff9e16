"""storage.local_fsync reaches the worker processes: with it on (the default) every
commit's WAL objects are fsynced (silo_local_fsync_seconds counts one round per commit),
with --no-local-fsync none is."""

from __future__ import annotations

from tests.integration.harness import Server
from tests.integration.test_metrics import enqueue_on_every_shard, scrape, total, wait_for


def _counts(srv: Server, n: int, rounds_match: bool) -> tuple[float, float]:
    """(commits confirmed durable, fsync rounds) once the enqueues' commits are counted
    (and, with rounds_match, once every commit's round is: a metrics flush may fall
    between a commit's two observations)."""
    def ready():
        f = scrape(srv)
        commits = total(f, "silo_commit_durable_wait_seconds_count")
        rounds = total(f, "silo_local_fsync_seconds_count")
        ok = total(f, "silo_jobs_enqueued_total") >= n and commits >= n
        return (commits, rounds) if ok and (rounds == commits or not rounds_match) else None
    return wait_for(ready, what="enqueue, commit and fsync counts")


def test_on_by_default_one_round_per_commit(tmp_path):
    with Server(tmp_path / "d", "--processes", "2", "--shards", "2") as srv:
        n = enqueue_on_every_shard(srv, 5)  # one at a time: one commit each
        commits, rounds = _counts(srv, n, rounds_match=True)
        assert rounds == commits >= n


def test_off_no_fsync(tmp_path):
    with Server(tmp_path / "d", "--processes", "2", "--shards", "2", "--no-local-fsync") as srv:
        n = enqueue_on_every_shard(srv, 5)
        commits, rounds = _counts(srv, n, rounds_match=False)
        assert commits >= n and rounds == 0
