"""clone-local's endpoint directory (engine/ipc.py): only its owner can reach a socket in it."""

import os
import socket
import stat

import pytest

from engine.ipc import EndpointDir


def _connect_as(uid: int, path: str) -> int:
    """connect(2) to ``path`` from a forked child running as ``uid``: 0 if it connected,
    13 if refused for permission, 99 for anything else. The child leaves with os._exit."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            if uid != os.getuid():
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            socket.socket(socket.AF_UNIX).connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_directory_is_private_and_goes_with_close() -> None:
    with EndpointDir() as d:
        st = os.stat(d.path)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert d.endpoint("donor") == f"ipc://{d.path}/donor"
        with pytest.raises(ValueError):
            d.endpoint("../x")
    assert not os.path.exists(d.path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_reach_an_endpoint() -> None:
    with EndpointDir() as d, socket.socket(socket.AF_UNIX) as listener:
        path = os.path.join(d.path, "donor")
        # Under umask 0 the socket file itself is open to all (0777): the directory
        # alone must keep others out.
        old = os.umask(0)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(4)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
        # The owner can connect (so the check below can fail) ...
        assert _connect_as(os.getuid(), path) == 0
        # ... and nobody else can: they cannot enter the directory.
        assert _connect_as(65534, path) == 13
