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
