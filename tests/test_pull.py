"""serve and pull as real processes over loopback, on a tree with every case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    CLI,
    ROOT,
    Donor,
    allocated,
    describe,
    free_port,
    make_tree,
    plain_peer,
    run_cli,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("donor") / "data"
    make_tree(root)
    return root


def test_pull_copies_everything_faithfully(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "clone"
    with Donor(tree) as donor:
        res = run_cli("pull", f"root@{donor.address}", "--data-dir", str(dest),
                      "--max-concurrency", "4", "--no-autotune-concurrency")
        assert res.returncode == 0, res.stderr
    assert describe(dest) == describe(tree)
    # holes are not written: the sparse files stay sparse
    assert allocated(dest / "sparse") <= allocated(tree / "sparse") + 8192
    assert allocated(dest / "sparse_tail") <= allocated(tree / "sparse_tail") + 8192
    assert "--allow-anonymous: anyone who reaches" in donor.stderr  # said at start
    st = json.loads(run_cli("status", str(dest), "--json").stdout)
    assert st["clone_status"]["encrypted"] is True  # the default: encrypted when offered
    assert st["clone_status"]["donor_key"].startswith("SHA256:")
    assert st["clone_status"]["state"] == "Completed"
    assert st["clone_status"]["source"] == donor.address
    assert st["clone_status"]["destination"] == str(dest)
    assert st["clone_status"]["error_no"] == 0
    rows = {r["stage"]: r for r in st["clone_progress"]}
    assert [r["stage"] for r in st["clone_progress"]] == [
        "DROP DATA", "FILE COPY", "PAGE COPY", "REDO COPY", "FILE SYNC", "RESTART", "RECOVERY"]
    for name in ("DROP DATA", "FILE COPY", "FILE SYNC"):
        assert rows[name]["state"] == "Completed" and rows[name]["end_time"]
    for name in ("PAGE COPY", "REDO COPY", "RESTART", "RECOVERY"):
        assert rows[name]["state"] == "Not Started"
    assert rows["FILE COPY"]["data"] == rows["FILE COPY"]["estimate"] > 20 << 20
    assert 0 < rows["FILE COPY"]["network"] < rows["FILE COPY"]["data"]  # holes not sent
    assert rows["FILE COPY"]["threads"] == 4


def test_json_events_end_with_a_summary(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "clone"
    with Donor(tree) as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), "--json",
                      "--max-concurrency", "3")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events[-1]["event"] == "summary"
    # autotuning starts at one stream and never exceeds clone_max_concurrency
    assert 1 <= events[-1]["clone_progress"][1]["threads"] <= 3
    assert all(1 <= h["streams"] <= 3 for h in events[-1]["autotune"])
    assert events[-1]["clone_status"]["state"] == "Completed"
    assert any(e["event"] == "stage" and e["stage"] == "FILE COPY" for e in events)


def test_two_clones_in_a_row_and_many_streams(tree: Path, tmp_path: Path) -> None:
    with Donor(tree) as donor:
        for i, streams in enumerate(("16", "2")):
            dest = tmp_path / f"clone{i}"
            res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest),
                          "--max-concurrency", streams)
            assert res.returncode == 0, res.stderr
            assert describe(dest) == describe(tree)


def test_clone_local(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "local"
    res = run_cli("clone-local", str(tree), "--data-dir", str(dest))
    assert res.returncode == 0, res.stderr
    assert describe(dest) == describe(tree)
    res = run_cli("clone-local", str(tree), "--data-dir", str(tree / "inside"))
    assert res.returncode == 3 and "ERROR 3632" in res.stderr


def test_destination_rules(tree: Path, tmp_path: Path) -> None:
    existing = tmp_path / "exists"
    existing.mkdir()
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(existing))
    assert res.returncode == 3  # the destination refused
    assert f"ERROR 1007 (HY000): Can't create database '{existing}'; database exists" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", "relative/path")
    assert res.returncode == 2 and "Incorrect DATA DIRECTORY value" in res.stderr
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(tmp_path / "no" / "parent"))
    assert res.returncode == 1 and "parent" in res.stderr
    assert not (tmp_path / "no").exists()


def test_bench_refuses_a_missing_bench_directory(tmp_path: Path) -> None:
    res = run_cli("bench", "--quick", "--shape", "mixed",
                  env={"CLONE_AGENT_BENCH_DIR": str(tmp_path / "missing")})
    assert res.returncode == 1
    assert "ERROR 8002 (HY000): File operation failed: the bench directory" in res.stderr
    assert "hint: " in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "missing").exists()


def test_valid_donor_list_is_checked_before_anything_is_created(tmp_path: Path) -> None:
    dest = tmp_path / "c"
    res = run_cli("pull", "u@127.0.0.1:3310", "--data-dir", str(dest),
                  "--valid-donor-list", "10.0.0.5:3310")
    assert res.returncode == 3  # the source refused
    assert ("ERROR 3869 (HY000): Clone system configuration: 127.0.0.1:3310 is not found in "
            "clone_valid_donor_list: 10.0.0.5:3310") in res.stderr
    assert "hint:" in res.stderr
    assert not dest.exists()
    res = run_cli("pull", "u@127.0.0.1:3310", "--data-dir", str(dest),
                  "--valid-donor-list", "10.0.0.5")
    assert res.returncode == 2 and "ERROR 3869" in res.stderr and "Invalid Format" in res.stderr
    res = run_cli("pull", "u@127.0.0.1:3310", "--data-dir", str(dest),
                  env={"CLONE_AGENT_MAX_CONCURRENCY": "0"})
    assert res.returncode == 2 and "ERROR 1231" in res.stderr
    assert "clone_max_concurrency" in res.stderr
    assert not dest.exists()


def test_unreachable_donor_fails_fast_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "c"
    port = free_port()
    started = time.monotonic()
    res = run_cli("pull", f"u@127.0.0.1:{port}", "--data-dir", str(dest), "--json")
    assert time.monotonic() - started < 30
    assert res.returncode == 5  # unreachable: retry when the donor is up
    assert "ERROR 3862 (HY000): Clone Donor Error: Connect failed: 2003" in res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["error_no"] == 3862
    assert not dest.exists()
    st = json.loads(run_cli("status", str(dest), "--json").stdout)
    assert st["clone_status"]["state"] == "Failed" and st["clone_status"]["error_no"] == 3862
    assert [r["state"] for r in st["clone_progress"]] == ["Failed"] + ["Not Started"] * 6


def test_a_silent_listener_fails_within_the_handshake_deadline(tmp_path: Path) -> None:
    import socket
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        res = run_cli("pull", f"u@127.0.0.1:{port}", "--data-dir", str(tmp_path / "c"),
                      "--connect-timeout", "2")
    assert res.returncode == 5 and "ERROR 3862" in res.stderr
    assert not (tmp_path / "c").exists()


def test_second_concurrent_clone_gets_3634(tree: Path, tmp_path: Path) -> None:
    import zmq

    from engine import protocol as P
    with Donor(tree) as donor:
        ctx = zmq.Context()
        sock = plain_peer(ctx, donor.address)
        sock.send_multipart(P.command(P.INIT, {"version": P.PROTOCOL_VERSION,
                                               "user": "first"}))
        assert sock.poll(10000)
        assert P.decode(sock.recv_multipart(), P.RESP).kind == P.CONFIG
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "c"))
        sock.close()
        ctx.term()
    assert res.returncode == 4  # busy: retry later
    assert "ERROR 3634 (HY000): Too many concurrent clone operations. Maximum allowed - 1." \
        in res.stderr
    assert not (tmp_path / "c").exists()


def test_sigterm_stops_the_donor_cleanly(tree: Path) -> None:
    donor = Donor(tree)
    with donor:
        pass
    assert donor.proc is not None and donor.proc.returncode == 0
    assert "Traceback" not in donor.stderr


def _big_source(tmp_path: Path) -> tuple[Path, Path]:
    """48 MiB in six files (a clone that lasts long enough to be interrupted), and
    where its clone goes."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    return src, tmp_path / "c"


def test_ctrl_c_of_a_pull_removes_the_partial_clone(tmp_path: Path) -> None:
    src, dest = _big_source(tmp_path)
    with Donor(src) as donor:
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                                 "--max-concurrency", "1", "--buffer-size", "1MiB"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT)
        deadline = time.monotonic() + 30
        while not (dest / "#clone").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for the clone to start, bounded
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the clone finished before the signal landed")
    assert proc.returncode == 130 and "ERROR 1317" in err and "Traceback" not in err
    assert not dest.exists()


def test_a_terminal_ctrl_c_reaches_the_command_line_alone(tmp_path: Path) -> None:
    """A terminal's Ctrl-C goes to the whole foreground process group. It comes here as
    soon as the clone has begun, while the writers may still be starting: they must not
    die of it (they run in groups of their own), and the answer is 1317, not 8002."""
    src, dest = _big_source(tmp_path)
    with Donor(src) as donor:
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                                 "--buffer-size", "1MiB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, start_new_session=True)
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the first progress line: DROP DATA is done
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip("the clone finished before the signal landed")
    err = first + rest
    assert proc.returncode == 130 and "ERROR 1317" in err, err
    assert "Traceback" not in err and "8002" not in err, err
    assert not dest.exists()


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compression_counts_data_and_network_apart(tmp_path: Path, codec: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "text.log").write_bytes(b"clone-agent compresses text well. " * 200000)
    (src / "random.bin").write_bytes(os.urandom(3 << 20))  # sent as it is
    dest = tmp_path / "c"
    with Donor(src) as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), "--json",
                      "--enable-compression", env={"CLONE_AGENT_COMPRESSION_ALGORITHM": codec})
    assert res.returncode == 0, res.stderr
    assert describe(dest) == describe(src)
    row = json.loads(res.stdout.splitlines()[-1])["clone_progress"][1]
    assert row["data"] == (3 << 20) + 34 * 200000
    assert row["network"] < (3 << 20) + 34 * 200000 // 5  # the text shrank, the random not


def test_the_donor_cuts_the_block_size_the_recipient_asks_for(tree: Path) -> None:
    import zmq

    from engine import protocol as P
    with Donor(tree) as donor:
        ctx = zmq.Context()
        try:
            # A connection a probe: a clone's connection ends with its clone, and a bad
            # INIT ends its connection. The INIT of the next may overtake the EXIT of
            # the last (another connection) and find the donor busy: then it asks again.
            for asked, answer in ((256 << 10, P.CONFIG), (None, P.CONFIG), (3 << 20, P.ERROR),
                                  (8 << 20, P.ERROR)):
                body: dict[str, Any] = {"version": P.PROTOCOL_VERSION, "user": "u"}
                if asked is not None:
                    body["block_size"] = asked
                deadline = time.monotonic() + 10
                while True:
                    sock = plain_peer(ctx, donor.address)
                    sock.send_multipart(P.command(P.INIT, body))
                    assert sock.poll(10000)
                    msg = P.decode(sock.recv_multipart(), P.RESP)
                    if msg.body.get("error_no") != 3634 or time.monotonic() > deadline:
                        break
                    sock.close()  # the last probe's clone is still ending; bounded
                assert msg.kind == answer, (asked, msg.body)
                if answer == P.CONFIG:  # absent: 1 MiB, as before it was negotiated
                    assert msg.body["block_size"] == (asked or 1 << 20)
                    sock.send_multipart(P.command(P.EXIT, {"clone_id": msg.body["clone_id"],
                                                           "ok": False}))
                sock.close(linger=2000)  # the EXIT goes out before the socket does
        finally:
            ctx.destroy(linger=0)  # closes the socket too, where an assertion failed


def test_bandwidth_limit_is_applied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(12 << 20))
    dest = tmp_path / "c"
    with Donor(src) as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), "--json",
                      "--max-data-bandwidth", "8", "--max-network-bandwidth", "100")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[-1])["clone_progress"][1]
    # the figures report what happened; bench/ measures the accuracy
    assert 0 < row["data_speed"] <= 9 << 20


def test_donor_stopped_mid_clone_fails_the_clone_cleanly(tmp_path: Path) -> None:
    from engine.pagestore import init_datadir

    src = tmp_path / "src"
    init_datadir(str(src), 32 << 20, accounts=1000)
    dest = tmp_path / "c"
    with Donor(src, "--workload", "200", "--debug-sync", "clone_page_copy=2000") as donor:
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT)
        deadline = time.monotonic() + 30
        while not (src / "#ib_archive").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # until the clone has reached its snapshot, bounded
        assert donor.stop() == 0  # SIGTERM: the donor ends the clone and exits 0
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert "ERROR 3862 (HY000): Clone Donor Error: 1317 : Query execution was interrupted" in err
    assert not dest.exists() and not (src / "#ib_archive").exists()
    assert json.loads(run_cli("verify", str(src), "--json").stdout)["ok"]


def test_a_recipient_killed_mid_clone(tmp_path: Path) -> None:
    """kill -9 of pull: its workers exit by themselves, its ring is swept by the next
    start, and the donor drops the orphaned clone after its idle timeout."""
    from engine.ring import sweep_stale

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    dest = tmp_path / "c"
    with Donor(src, "--idle-timeout", "2") as donor:
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                                 "--max-data-bandwidth", "4"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.monotonic() + 30
        while not (dest / "f0").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # until data flows, bounded
        proc.kill()
        proc.communicate(timeout=10)
        removed = []
        deadline = time.monotonic() + 15
        while not removed and time.monotonic() < deadline:
            removed = [n for n in sweep_stale() if n.startswith(f"clone-agent-{proc.pid}-")]
            time.sleep(0.1)  # the killed process's ring is swept once it is gone
        assert removed
        # the donor serves the next clone once it has dropped the orphan (idle 2 s)
        deadline = time.monotonic() + 30
        res = None
        while time.monotonic() < deadline:
            res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "again"))
            if res.returncode == 0 or "ERROR 3634" not in res.stderr:
                break
            time.sleep(0.5)  # 3634 while the donor still holds the orphan; bounded
        assert res is not None and res.returncode == 0, res.stderr
    # the donor dropped the orphan: it fell silent, or its connection was gone
    assert "silent" in donor.stderr or "cannot reach a recipient" in donor.stderr
