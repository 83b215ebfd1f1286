"""Private IPC endpoints: ZeroMQ ``ipc://`` socket files in a directory only we can enter.

An abstract-namespace endpoint (``ipc://@name``) has no owner and no permission bits:
its name is listed in /proc/net/unix, and any local user can connect to it. On a
stage's descriptor channel that would let another user take descriptors meant for a
worker (a PUSH socket deals round-robin to whoever connects), or push a forged "done"
that acknowledges a block never written; on clone-local's donor endpoint, pull the data
directory. A socket file in a 0700 directory can be reached by its owner (and root)
only: connect(2) needs search permission on every directory of the path.

An :class:`EndpointDir` is created and removed by one process (a stage's coordinator,
clone-local's command line), in ``/dev/shm`` beside the rings, named
``clone-agent-<pid>-<random>.ipc``. ``close()`` removes it with what ZeroMQ left in it;
a kill -9 of the owner leaves it, and :func:`engine.ring.sweep_stale` removes those of
dead processes at the next start.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from engine.ring import PREFIX, SHM_DIR

SUFFIX = ".ipc"


class EndpointDir:
    """A 0700 directory for the socket files of one owner's endpoints."""

    def __init__(self, base: str = SHM_DIR) -> None:
        # mkdtemp creates the directory with mode 0700, under a name no one else has.
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", suffix=SUFFIX,
                                     dir=base)

    def endpoint(self, name: str) -> str:
        """``ipc://`` URL of a socket file named ``name`` in this directory."""
        if not name or "/" in name:
            raise ValueError(f"bad endpoint name {name!r}")
        return f"ipc://{self.path}/{name}"

    def close(self) -> None:
        """Remove the directory and every socket file left in it. Idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> EndpointDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
