"""engine/swap.py: what a crash leaves at every step of a swap is rolled back before
the commit point and forward after it, by whoever settles next; a live pull's work is
never settled by another; the locks keep owners and swaps apart.

A crash is a :class:`CrashAt` wrapper of the real kill points: it raises where the pull
would SIGKILL itself, and nothing of the swap catches it, so what is on disk is what a
kill -9 there leaves (tests/test_replace.py kills real pulls)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.errors import CloneInProgress, LocalIOError
from engine.faults import KillPoints
from engine.status import StatusBook, read_status
from engine.swap import (
    DirLock,
    PullLock,
    Swap,
    SwapPaths,
    drop_tree,
    finish,
    open_shared,
    read_journal,
    rollback,
    settle,
    settle_gone,
    top_names,
    tree_bytes,
)
from tests.helpers import describe


class Crash(Exception):
    pass


class CrashAt(KillPoints):
    def reached(self, point: str) -> None:
        if point == self.at:
            raise Crash(point)


def _trees(root: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """DATADIR with an old tree, and a whole clone in #clone/#new/ (sharing a name)."""
    d = root / "data"
    (d / "olddir" / "deep").mkdir(parents=True)
    (d / "olddir" / "deep" / "f").write_bytes(b"old deep")
    (d / "common").write_bytes(b"old common")
    (d / "only_old").write_bytes(os.urandom(5000))
    os.symlink("only_old", d / "link_old")
    os.chmod(d / "olddir" / "deep", 0o500)  # a read-only directory to remove
    (d / "#clone").mkdir()
    new = d / "#clone" / "#new"
    (new / "newdir").mkdir(parents=True)
    (new / "#clone").mkdir()  # the clone's own, never swapped in
    (new / "newdir" / "g").write_bytes(b"new g")
    (new / "common").mkdir()  # a file before, a directory now
    (new / "common" / "h").write_bytes(b"new h")
    (new / "only_new").write_bytes(os.urandom(7000))
    return d, describe(d), describe(new)


def _crash_swap(d: Path, point: str) -> None:
    """A pull that dies at ``point`` of its swap: its locks go with it."""
    paths = SwapPaths(str(d))
    with DirLock(str(d)) as lock:
        assert lock.try_exclusive()
        pull = PullLock(paths)
        try:
            assert pull.try_lock()
            swap = Swap(str(d), CrashAt(point))
            with pytest.raises(Crash):
                swap.run(None)
                journal = read_journal(paths)
                assert journal is not None
                finish(paths, journal, kill=CrashAt(point))
        finally:
            pull.close()


RENAMES = 4 + 3  # old entries out, new entries in


@pytest.mark.parametrize("point", ["journal", *[f"rename:{i}" for i in range(1, RENAMES + 1)],
                                   "renamed"])
def test_a_crash_before_the_commit_point_is_rolled_back(tmp_path: Path, point: str) -> None:
    d, old, _ = _trees(tmp_path)
    before = os.stat(d)
    _crash_swap(d, point)
    assert read_journal(SwapPaths(str(d)))["state"] == "swapping"
    assert settle(str(d)) == "rolled back"
    assert describe(d) == old
    assert sorted(os.listdir(d / "#clone")) == ["#pull.lock"]
    assert os.stat(d).st_mtime_ns == before.st_mtime_ns  # its times put back too
    assert settle(str(d)) is None  # nothing left to do


@pytest.mark.parametrize("point", ["swapped", "drop:1", "drop:2", "drop:4", "dropped"])
def test_a_crash_after_the_commit_point_is_rolled_forward(tmp_path: Path, point: str) -> None:
    d, _, new = _trees(tmp_path)
    _crash_swap(d, point)
    assert read_journal(SwapPaths(str(d)))["state"] == "swapped"
    assert settle(str(d)) == "finished"
    assert describe(d) == new
    assert sorted(os.listdir(d / "#clone")) == ["#pull.lock"]


def test_a_whole_swap_with_keep_old(tmp_path: Path) -> None:
    d, old, new = _trees(tmp_path)
    keep = tmp_path / "kept"
    swap = Swap(str(d))
    swap.run(str(keep))
    paths = SwapPaths(str(d))
    journal = read_journal(paths)
    assert journal is not None and journal["old"] == ["common", "link_old", "olddir",
                                                      "only_old"]
    assert journal["new"] == ["common", "newdir", "only_new"]
    assert finish(paths, journal) == 0
    assert describe(d) == new and describe(keep) == old
    assert top_names(str(d)) == ["common", "newdir", "only_new"]


def test_a_keep_old_that_appeared_meanwhile_is_never_overwritten(tmp_path: Path) -> None:
    d, old, new = _trees(tmp_path)
    keep = tmp_path / "kept"
    Swap(str(d)).run(str(keep))
    keep.mkdir()  # someone made it after the preflight
    paths = SwapPaths(str(d))
    with pytest.raises(LocalIOError, match="exists"):
        finish(paths, read_journal(paths) or {})
    assert describe(d) == new and describe(Path(paths.old)) == old  # kept where it was


def test_drop_counts_bytes_and_tolerates_a_second_remover(tmp_path: Path) -> None:
    d, _, _ = _trees(tmp_path)
    total = tree_bytes(str(d / "olddir")) + tree_bytes(str(d / "only_old"))
    assert tree_bytes(str(d)) >= total == len(b"old deep")
    seen: list[int] = []
    assert drop_tree(str(d / "olddir"), seen.append) == len(b"old deep")
    assert seen and seen[-1] == len(b"old deep")
    assert drop_tree(str(d / "olddir")) == 0  # already gone: nothing, no error


def test_settle_leaves_a_live_pull_alone(tmp_path: Path) -> None:
    d, _, _ = _trees(tmp_path)
    paths = SwapPaths(str(d))
    _crash_swap(d, "rename:2")
    live = PullLock(paths)  # another open file description: as another process's
    try:
        assert live.try_lock()
        with pytest.raises(CloneInProgress):
            settle(str(d))  # an owner about to open the data must not
        assert settle(str(d), strict=False) is None  # status reads on
        with pytest.raises(CloneInProgress):
            open_shared(str(d))
        assert read_journal(paths)["state"] == "swapping"
    finally:
        live.close()
    assert settle(str(d)) == "rolled back"


def test_a_copy_whose_pull_died_is_removed(tmp_path: Path) -> None:
    d, old, _ = _trees(tmp_path)
    assert settle(str(d)) == "removed"
    assert describe(d) == old and not (d / "#clone" / "#new").exists()


def test_owners_and_swaps_exclude_each_other(tmp_path: Path) -> None:
    d, _, _ = _trees(tmp_path)
    (d / "#clone" / "#new").rename(tmp_path / "elsewhere")
    owner = open_shared(str(d))
    try:
        with DirLock(str(d)) as pull:
            assert not pull.try_exclusive()  # no swap under an owner
            assert pull.try_shared()  # but a pull can see the owner is one
        second = open_shared(str(d))  # owners share
        second.close()
    finally:
        owner.close()
    with DirLock(str(d)) as pull:
        assert pull.try_exclusive()
        with pytest.raises(CloneInProgress):
            open_shared(str(d))
        pull.share()
        open_shared(str(d)).close()  # a server reopening beside the pull's shared lock


def test_an_undo_waits_for_the_owner_that_holds_the_data(tmp_path: Path) -> None:
    """Rolling back needs DATADIR exclusive: an owner holding it (one that did not
    settle first) keeps the journal as it is."""
    d, old, _ = _trees(tmp_path)
    _crash_swap(d, "rename:3")
    with DirLock(str(d)) as owner:
        assert owner.try_shared()
        assert settle(str(d), strict=False) is None
        with pytest.raises(CloneInProgress):
            settle(str(d))
    assert settle(str(d)) == "rolled back" and describe(d) == old


def test_a_journal_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    d, _, _ = _trees(tmp_path)
    (d / "#clone" / "#swap").write_bytes(orjson.dumps({"state": "something"}))
    with pytest.raises(LocalIOError, match="not one we wrote"):
        settle(str(d))


@pytest.mark.parametrize(("point", "state", "error_no"), [("rename:2", "Failed", 1317),
                                                          ("swapped", "Completed", 0)])
def test_the_status_says_what_settling_did(tmp_path: Path, point: str, state: str,
                                           error_no: int) -> None:
    d, _, _ = _trees(tmp_path)
    book = StatusBook("h:1", str(d))
    book.attach(str(d))
    book.begin()
    book.begin_stage("FILE SYNC")
    _crash_swap(d, point)
    settle(str(d))
    st = read_status(str(d), None)
    assert st["clone_status"]["state"] == state
    assert st["clone_status"]["error_no"] == error_no
    assert st["clone_progress"][4]["state"] == ("Completed" if error_no == 0 else "Failed")


def test_a_plain_directory_settles_in_no_time(tmp_path: Path) -> None:
    assert settle(str(tmp_path)) is None
    assert settle(str(tmp_path / "missing"), strict=False) is None
    assert not (tmp_path / "#clone").exists()


def test_an_undo_that_was_itself_interrupted_settles_again(tmp_path: Path) -> None:
    """A crash during the rollback, once the entries are back but before the journal is
    removed: the next settle finds nothing to move, and ends it."""
    d, old, _ = _trees(tmp_path)
    _crash_swap(d, "rename:6")
    paths = SwapPaths(str(d))
    with pytest.raises(Crash):
        rollback(paths, read_journal(paths) or {}, CrashAt("undone"))
    assert describe(d) == old and read_journal(paths) is not None
    assert settle(str(d)) == "rolled back"
    assert describe(d) == old and not Path(paths.new).exists()
    assert not Path(paths.journal).exists() and not Path(paths.old).exists()


def test_an_undo_refuses_a_state_no_swap_leaves(tmp_path: Path) -> None:
    d, _, _ = _trees(tmp_path)
    _crash_swap(d, "rename:2")
    paths = SwapPaths(str(d))
    (d / "link_old").write_bytes(b"someone put this here")  # also in #old/ now
    with pytest.raises(LocalIOError, match="both in"):
        settle(str(d))
    assert (Path(paths.old) / "link_old").is_symlink()  # nothing overwritten
    shutil.rmtree(paths.new)
    with pytest.raises(LocalIOError, match="is gone"):
        settle(str(d))


_DYING_PULL = """
import sys, time
from engine.swap import DirLock, PullLock, SwapPaths
d = sys.argv[1]
pull = PullLock(SwapPaths(d))
assert pull.try_lock()
data = DirLock(d)
assert data.try_exclusive()
print("held", flush=True)
time.sleep(float(sys.argv[2]))  # a process on its way out: its locks go when it ends
"""


def test_what_an_ending_pull_left_is_settled_once_its_locks_go(tmp_path: Path) -> None:
    """A pull killed mid-swap: its server may see its channel close before the kernel
    has closed the pull's locks. settle() alone refuses then; settle_gone() retries
    until they go, and rolls back."""
    d, old, _ = _trees(tmp_path)
    _crash_swap(d, "rename:2")
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, "-c", _DYING_PULL, str(d), "0.5"], cwd=root,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline().strip() == "held"
        with pytest.raises(CloneInProgress):
            settle(str(d))  # the moment the server reacts: the locks are still held
        started = time.monotonic()
        assert settle_gone(str(d), 10.0) == "rolled back"
        assert time.monotonic() - started < 10.0
    finally:
        child.kill()
        child.wait(10)
    assert describe(d) == old and read_journal(SwapPaths(str(d))) is None


def test_settle_gone_gives_up_after_its_time(tmp_path: Path) -> None:
    d, _, _ = _trees(tmp_path)
    _crash_swap(d, "rename:2")
    live = PullLock(SwapPaths(str(d)))
    try:
        assert live.try_lock()  # a pull that does not end
        started = time.monotonic()
        assert settle_gone(str(d), 0.3) is None
        assert 0.3 <= time.monotonic() - started < 5
        assert read_journal(SwapPaths(str(d)))["state"] == "swapping"  # left as it was
    finally:
        live.close()
