import pytest

from engine.errors import DonorError, NoStatus
from engine.status import STAGES, StatusBook, read_status


def test_a_running_clone_reads_as_interrupted(tmp_path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    book = StatusBook("h:1", str(dest), str(tmp_path / "state"))
    book.attach(str(dest))
    book.begin()
    book.begin_stage("FILE COPY", estimate=100, threads=4)
    data = read_status(str(dest), None)
    st = data["clone_status"]
    assert st["state"] == "In Progress" and st["error_no"] == 1317
    assert [r["stage"] for r in data["clone_progress"]] == list(STAGES)
    row = data["clone_progress"][1]
    assert row["state"] == "In Progress" and row["estimate"] == 100 and row["threads"] == 4
    assert set(row) == {"id", "stage", "state", "begin_time", "end_time", "threads",
                        "estimate", "data", "network", "data_speed", "network_speed"}


def test_failure_survives_removal_of_the_destination(tmp_path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    book = StatusBook("h:1", str(dest), str(tmp_path / "state"))
    book.attach(str(dest))
    book.begin()
    book.begin_stage("DROP DATA")
    book.fail(DonorError("Connect failed"))
    book.detach()
    (dest / "#clone" / "#view_status").unlink()
    data = read_status(str(dest), str(tmp_path / "state"))
    assert data["clone_status"]["state"] == "Failed"
    assert data["clone_status"]["error_no"] == 3862
    states = [r["state"] for r in data["clone_progress"]]
    assert states == ["Failed"] + ["Not Started"] * 6


def test_no_status(tmp_path) -> None:
    with pytest.raises(NoStatus):
        read_status(str(tmp_path / "nothing"), str(tmp_path))


def test_a_running_clone_shows_no_error_until_its_process_is_gone(tmp_path) -> None:
    from engine.status import present

    dest = tmp_path / "d"
    dest.mkdir()
    book = StatusBook("h:1", str(dest))
    book.attach(str(dest))
    book.begin()
    book.save(force=True)
    stored = read_status(str(dest), None)["clone_status"]
    assert stored["error_no"] == 1317  # on disk: a crash reads as interrupted
    shown = present(stored, lambda pid: True)
    assert shown["state"] == "In Progress" and shown["error_no"] == 0
    assert shown["error_message"] == ""
    gone = present(stored, lambda pid: False)
    assert gone["state"] == "Failed" and gone["error_no"] == 1317


def test_the_history_is_bounded_and_newest_first(tmp_path) -> None:
    import os

    from engine.status import HISTORY, _record_path, list_history

    state = tmp_path / "state"
    for i in range(HISTORY + 5):
        dest = tmp_path / f"d{i}"
        book = StatusBook("h:1", str(dest), str(state))
        book.begin()
        book.save(force=True)
        # mtimes a second apart, whatever the file system's resolution
        os.utime(_record_path(str(state), str(dest)), (1000 + i, 1000 + i))
    rows = list_history(str(state))
    assert len(list(state.iterdir())) == HISTORY
    assert len(rows) == HISTORY
    assert rows[0]["destination"] == str(tmp_path / f"d{HISTORY + 4}")
    assert rows[-1]["destination"] == str(tmp_path / "d5")  # d0..d4 were pruned

