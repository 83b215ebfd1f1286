"""engine/control.py and donor/control.py: how a pull finds the server of a directory,
and the server's side of reserve, release and reopen, over real Unix sockets.

The server here is a stand-in with the three calls the channel makes; a real
``serve`` restarted by a real ``pull --replace`` is in tests/test_replace.py."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from donor.control import ServeControl
from engine.control import INFO_NAME, ControlClient, ServerInfo, find_servers
from engine.errors import CloneInProgress, ProtocolError, RestartFailed
from engine.swap import DirLock


class StandIn:
    workload_rate = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"paged": False, "workload": None, "last_txn": None}

    def release_datadir(self) -> dict[str, Any]:
        self.calls.append("release")
        return {"last_txn": 7}

    def reopen_datadir(self) -> dict[str, Any]:
        self.calls.append("reopen")
        return {"last_txn": 9}


class Served:
    """A ServeControl in this process, and a way to run its loop until a condition."""

    def __init__(self, datadir: Path) -> None:
        self.server = StandIn()
        self.poller = zmq.Poller()
        self.control = ServeControl(self.server, str(datadir))

    def __enter__(self) -> Served:
        self.control.__enter__()
        self.control.listen("127.0.0.1:1", self.poller)
        return self

    def __exit__(self, *exc: object) -> None:
        self.control.close()

    def info(self) -> ServerInfo:
        assert self.control.endpoint is not None
        return next(s for s in find_servers() if s.socket.startswith(self.control.endpoint.path))

    def spin(self, until: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the control channel did not answer"
            self.control.handle(dict(self.poller.poll(10)))

    def call(self, client: ControlClient, op: str, **args: Any) -> dict[str, Any]:
        """A call whose answer this process's loop must produce: the request is sent,
        the loop run until the answer is there, then read."""
        assert client.sock is not None
        client.sock.sendall(orjson.dumps({"op": op, **args}) + b"\n")
        self.spin(lambda: _readable(client))
        client.sock.settimeout(5)
        line = b""
        while not line.endswith(b"\n"):
            line += client.sock.recv(1)
        reply: dict[str, Any] = orjson.loads(line)
        return reply


def _readable(client: ControlClient) -> bool:
    import select

    assert client.sock is not None
    return bool(select.select([client.sock], [], [], 0)[0])


def test_a_server_is_found_by_its_directory_and_only_by_its_owner(tmp_path: Path) -> None:
    with Served(tmp_path) as served:
        info = served.info()
        assert info.datadir == str(tmp_path) and info.pid == os.getpid()
        assert info.bind == "127.0.0.1:1"
        endpoint = os.path.dirname(info.socket)
        assert stat.S_IMODE(os.stat(endpoint).st_mode) == 0o700
    assert not os.path.exists(endpoint)  # removed on close
    assert all(s.datadir != str(tmp_path) for s in find_servers())


def test_untrusted_endpoint_directories_are_ignored(tmp_path: Path) -> None:
    def fake(name: str, mode: int, pid: int) -> None:
        path = tmp_path / name
        path.mkdir()
        (path / INFO_NAME).write_bytes(orjson.dumps(
            {"pid": pid, "datadir": "/x", "bind": "h:1"}))
        os.chmod(path, mode)

    me = os.getpid()
    fake(f"clone-agent-{me}-good.ipc", 0o700, me)
    fake(f"clone-agent-{me}-open.ipc", 0o755, me)  # others could have planted it
    fake("clone-agent-999999999-dead.ipc", 0o700, 999999999)
    fake(f"clone-agent-{me}-ring", 0o700, me)  # not an endpoint directory
    os.symlink(tmp_path / f"clone-agent-{me}-good.ipc", tmp_path / f"clone-agent-{me}-l.ipc")
    found = find_servers(str(tmp_path))
    assert [os.path.basename(os.path.dirname(s.socket)) for s in found] == [
        f"clone-agent-{me}-good.ipc"]


def test_reserve_release_reopen_and_one_reservation_at_a_time(tmp_path: Path) -> None:
    with Served(tmp_path) as served:
        pull = ControlClient(served.info())
        other = ControlClient(served.info())
        try:
            hello = served.call(pull, "hello")
            assert hello["ok"] and hello["datadir"] == str(tmp_path) and not hello["released"]
            assert served.call(pull, "reserve", pid=1)["ok"]
            refused = served.call(other, "reserve", pid=2)
            assert refused["errno"] == CloneInProgress.errno and not refused["ok"]
            assert served.call(other, "release")["errno"] == ProtocolError.errno
            assert served.call(pull, "release") == {"ok": True, "last_txn": 7}
            assert served.control.released and served.control.lock is None
            with DirLock(str(tmp_path)) as lock:  # the directory is free for the swap
                assert lock.try_exclusive()
            assert served.call(pull, "reopen")["last_txn"] == 9
            assert served.server.calls == ["release", "reopen"]
            assert served.control.lock is not None and not served.control.released
        finally:
            pull.close()
            other.close()
        served.spin(lambda: served.control.reserved is None)


def test_a_pull_that_dies_released_gets_its_server_back(tmp_path: Path) -> None:
    with Served(tmp_path) as served:
        pull = ControlClient(served.info())
        served.call(pull, "reserve", pid=1)
        served.call(pull, "release")
        pull.close()  # the pull's end of file: as a kill -9 leaves it
        served.spin(lambda: not served.control.released)
        assert served.server.calls == ["release", "reopen"]
        assert served.control.reserved is None


def test_a_server_gone_is_3707_and_a_refusal_keeps_its_number(tmp_path: Path) -> None:
    gone = ServerInfo(123, str(tmp_path), "h:1", str(tmp_path / "no-socket"))
    with pytest.raises(RestartFailed) as exc:
        ControlClient(gone)
    assert exc.value.errno == 3707 and "does not answer" in exc.value.message
    with Served(tmp_path) as served:
        client = ControlClient(served.info(), timeout=0.2)
        try:
            with pytest.raises(RestartFailed, match="does not answer"):
                client.call("hello")  # nobody runs the server's loop: a timeout
        finally:
            client.close()
