"""silo.storage.manifest_tail's pure parts: when a manifest is torn, and when falling back
to the previous one is safe. No I/O: made-up manifests, WAL listings and compactor states."""

from __future__ import annotations

from silo.storage.manifest_tail import (
    Compactions,
    Decision,
    Manifest,
    decide,
    decide_compactions,
    torn_problem,
)
from silo.storage.wal_tail import WalObject

PREV = Manifest(id=4, replay_after=7, next_wal=8, compactor_epoch=1, initialized=True,
                clone=False, ssts=("A",))
COMP = Compactions(3, 1, 0)


def wal(*ids: int, torn: tuple[int, ...] = ()) -> list[WalObject]:
    return [WalObject(i, 0 if i == 1 else 500, "zeros" if i in torn else None) for i in ids]


def go(prev: Manifest | None = PREV, ssts: dict | None = None,
       objects: list[WalObject] | None = None,
       compactions: Compactions | None = COMP,
       problem: str | None = "empty", present: frozenset[str] = frozenset({"A", "S"})
       ) -> Decision:
    return decide(5, problem, prev, None if prev else "is missing",
                  {"A": None} if ssts is None else ssts,
                  wal(1, *range(2, 18)) if objects is None else objects, compactions,
                  present)


# ---- torn_problem ------------------------------------------------------------------


def test_torn_by_evidence() -> None:
    assert torn_problem(b"", "empty manifest") == "empty"
    assert "shorter" in torn_problem(b"\x00", None)
    assert "version 0" in torn_problem(bytes(100), "unsupported … actual_version=0")
    assert "does not decode" in torn_problem(b"\x00\x02" + bytes(50), "RangeOutOfBounds")


def test_not_torn() -> None:
    assert torn_problem(b"\x00\x01abc", None) is None  # decodes
    # a format this SlateDB does not know: a newer one wrote it, left to SlateDB
    assert torn_problem(b"\x00\x07abc", "unsupported manifest format version") is None


# ---- decide ------------------------------------------------------------------------


def test_newest_not_torn_nothing_done() -> None:
    assert go(problem=None) == Decision(None, None)


def test_falls_back_when_everything_the_previous_needs_is_there() -> None:
    assert go() == Decision(5, None)
    assert go(compactions=None) == Decision(5, None)  # no compactor state yet


def test_previous_missing_or_unreadable_refused() -> None:
    d = go(prev=None)
    assert d.move is None and "missing" in d.refuse


def test_clone_or_uninitialized_refused() -> None:
    assert go(prev=PREV._replace(clone=True)).refuse
    assert go(prev=PREV._replace(initialized=False)).refuse


def test_sst_missing_or_torn_refused() -> None:
    d = go(ssts={"A": "missing", "B": None})
    assert d.move is None and "compacted/A.sst" in d.refuse and "missing" in d.refuse
    assert "1 more" in go(ssts={"A": "missing", "B": "info block checksum mismatch"}).refuse


def test_wal_gap_after_the_previous_boundary_refused() -> None:
    """The garbage collector deleted WAL objects the previous manifest replays."""
    d = go(objects=wal(1, 7, 9, 10, 11, 12))
    assert d.move is None and "00000000000000000008.sst" in d.refuse
    d = go(objects=wal(1, 12, 13))  # 8..11 gone, the boundary 12 kept
    assert "00000000000000000008.sst" in d.refuse


def test_wal_below_what_the_previous_had_seen_refused() -> None:
    """Nothing after the boundary at all, but the previous manifest saw WAL up to 9."""
    d = go(prev=PREV._replace(next_wal=10), objects=wal(1, 2, 3))
    assert d.move is None and "00000000000000000008.sst" in d.refuse


def test_nothing_to_replay_is_fine() -> None:
    assert go(objects=wal(1, 6, 7)) == Decision(5, None)
    assert go(objects=[]) == Decision(5, None)


def test_wal_torn_before_intact_refused_torn_tail_allowed() -> None:
    assert go(objects=wal(1, *range(2, 12), torn=(9,))).refuse
    # a torn tail is wal_tail's to move aside after the fallback
    assert go(objects=wal(1, *range(2, 12), torn=(11,))) == Decision(5, None)


def test_wal_at_or_below_the_boundary_ignored() -> None:
    assert go(objects=wal(3, 6, 7, 8, 9, torn=(6,))) == Decision(5, None)


def test_newer_compactor_epoch_refused() -> None:
    """The torn manifest was the compactor's epoch bump: an open from the previous one
    is fenced (measured, tests/integration/test_manifest_torn.py)."""
    d = go(compactions=Compactions(5, 2, 0))
    assert d.move is None and "compactor epoch 2" in d.refuse
    assert "00000000000000000005.compactions" in d.refuse


def test_unfinished_compaction_refused() -> None:
    d = go(compactions=Compactions(5, 1, 1))
    assert d.move is None and "not finished" in d.refuse


def test_completed_compaction_missing_from_the_previous_refused() -> None:
    """Its output is on disk but not in the previous manifest: the torn one committed it."""
    d = go(compactions=Compactions(5, 1, 0, frozenset({"S"})))
    assert d.move is None and "compacted/S.sst" in d.refuse


def test_completed_compaction_already_in_the_previous_or_collected_is_fine() -> None:
    assert go(compactions=Compactions(5, 1, 0, frozenset({"A"}))) == Decision(5, None)
    assert go(compactions=Compactions(5, 1, 0, frozenset({"GONE"}))) == Decision(5, None)


# ---- decide_compactions ------------------------------------------------------------


def test_compactions_not_torn_nothing_done() -> None:
    assert decide_compactions(5, None, None, None, 1) == Decision(None, None)


def test_compactions_start_from_the_previous_state() -> None:
    assert decide_compactions(5, "empty", Compactions(4, 1, 0), None, 1) == Decision(5, None)
    assert decide_compactions(5, "empty", Compactions(4, 0, 0), None, None) == Decision(5, None)


def test_lone_first_compactions_state_goes() -> None:
    """Id 1 is written empty at the compactor's first start; SlateDB makes it anew."""
    assert decide_compactions(1, "empty", None, None, 0) == Decision(1, None)


def test_compactions_previous_missing_or_unreadable_refused() -> None:
    assert "missing" in decide_compactions(5, "empty", None, None, 1).refuse
    d = decide_compactions(5, "empty", None, "00000000000000000004.compactions is "
                           "unreadable (x)", 1)
    assert "00000000000000000004.compactions" in d.refuse
    assert decide_compactions(1, "empty", None, "x is unreadable", 0).refuse


def test_compactions_previous_with_unfinished_compaction_refused() -> None:
    """A compaction the previous state calls running may already be in the manifest."""
    assert "not finished" in decide_compactions(5, "empty", Compactions(4, 1, 1), None,
                                                1).refuse


def test_compactions_previous_epoch_above_the_manifest_refused() -> None:
    assert "epoch 3" in decide_compactions(5, "empty", Compactions(4, 3, 0), None, 2).refuse
