"""What a clone needs to resume after its recipient process dies: ``DIR/#clone/#resume``.

A network failure is restarted by the running pull (recipient/transfer.py). A pull that
dies (kill -9, a reboot) leaves its destination and, in this file, where it stood: the
donor's CONFIG and every STATE answer so far, the clone's id and ATTACH secret, the
block key of an encrypted clone, the donor's key, and the locator of the current state.
``clone-agent pull USER@HOST:PORT --resume DIR`` reads it and sends REINIT with it,
while the donor still keeps the clone (its restart window).

The record must never claim a block that is not on disk: :class:`Checkpoint` takes the
locator first, then syncs the destination's file system (every block the locator names
was written before), then replaces the file atomically (a new file, fsync, rename,
fsync of the directory). It does so at most once a second, in a thread (syncfs and
fsync release the GIL), so the copy does not wait for it. The file is 0600: it holds
the secret and the key, which open this clone's stream to whoever reads them (the data
they protect is beside it in DIR, readable by the same user).
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from typing import Any

import orjson

from engine.errors import CloneError, CloneInProgress, UsageError
from engine.fsutil import fsync_dir, syncfs
from engine.ring import _alive
from engine.status import IN_PROGRESS, StatusBook, read_status
from recipient.destination import Destination

log = logging.getLogger("clone_agent.recipient")

RESUME_FILE = "#resume"  #: in DIR/#clone/
FORMAT = 1
EVERY = 1.0  #: seconds between two records


def path_of(root: str) -> str:
    return os.path.join(root, "#clone", RESUME_FILE)


def b64(raw: bytes | None) -> str | None:
    return base64.b64encode(raw).decode() if raw is not None else None


def unb64(text: Any) -> bytes | None:
    return base64.b64decode(text, validate=True) if isinstance(text, str) else None


class NothingToResume(CloneError):
    errno = 8011
    template = "Nothing to resume in '%s': %s"
    default_hint = "`pull --resume DIR` continues a clone whose recipient died; " \
        "start a new clone with --data-dir instead"


def load(root: str) -> dict[str, Any]:
    """The record of ``root``, checked for what a resume needs."""
    try:
        with open(path_of(root), "rb") as fh:
            record = orjson.loads(fh.read())
    except FileNotFoundError:
        raise NothingToResume(root, "no record of an interrupted clone (DIR/#clone/#resume)") \
            from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise NothingToResume(root, f"its record cannot be read ({exc})") from None
    needed = ("format", "source", "clone_id", "secret", "config", "states", "locator",
              "serial", "streams", "saved")
    if not isinstance(record, dict) or any(k not in record for k in needed) or \
            record["format"] != FORMAT:
        raise NothingToResume(root, "its record is not one this version writes")
    return record


def write(root: str, record: dict[str, Any]) -> None:
    """Replace the record atomically and durably."""
    final = path_of(root)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, orjson.dumps(record))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def remove(root: str) -> None:
    try:
        os.unlink(path_of(root))
    except FileNotFoundError:
        pass


class Checkpoint:
    """Keeps ``DIR/#clone/#resume`` at most ``EVERY`` seconds behind the copy."""

    def __init__(self, root: str, base: dict[str, Any]) -> None:
        self.root = root
        self.base = {"format": FORMAT, **base}
        self._pending: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._next = 0.0
        self.failed: BaseException | None = None

    def __enter__(self) -> Checkpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """The last record written; none after it."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(60.0)

    def due(self, now: float) -> bool:
        """Whether :meth:`offer` would take a state now (the caller may skip making
        one: that is most turns of the copy loop)."""
        return now >= self._next

    def offer(self, state: dict[str, Any], now: float, force: bool = False) -> None:
        """Where the clone stands now (the locator taken before any later write): kept
        for the next record. Cheap: called on every turn of the copy loop."""
        if not force and now < self._next:
            return
        self._next = now + EVERY
        with self._lock:
            self._pending = state
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                state, self._pending = self._pending, None
            if state is not None:
                try:
                    syncfs(self.root)  # every block the locator names is durable first
                    write(self.root, {**self.base, **state,
                                      "saved": time.time()})
                except OSError as exc:  # the clone goes on; a resume is then not offered
                    if self.failed is None:
                        log.warning("cannot record where the clone stands: %s", exc)
                    self.failed = exc
            if self._stop.is_set():
                return


def check(root: str, source: str) -> dict[str, Any]:
    """The record of an interrupted clone into ``root`` from ``source``, whose pull has
    ended; anything else is refused, and ``root`` is left as it is."""
    record = load(root)
    if record["source"] != source:
        raise UsageError(f"'{root}' is a clone from {record['source']}, not from {source}",
                         hint=f"resume it from {record['source']}")
    status = read_status(root, None)["clone_status"]
    pid = int(status.get("pid") or 0)
    if status.get("state") == IN_PROGRESS and pid and pid != os.getpid() and _alive(pid):
        raise CloneInProgress(hint=f"a pull (pid {pid}) still runs into '{root}': "
                              "`clone-agent kill` it first, or let it finish")
    return record


class Interrupted(Destination):
    """The destination of an interrupted clone: it exists, with its record. A resume
    that fails removes it, as the clone it continues would have."""

    def __init__(self, path: str, book: StatusBook) -> None:
        super().__init__(path, book)

    def check(self, earlier: list[CloneError]) -> None:
        from engine.errors import raise_all

        self.path = os.path.normpath(os.path.abspath(self.path))
        problems = list(earlier)
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            problems.append(NothingToResume(self.path, "it is not a directory"))
        raise_all(problems)
        self.book.status.destination = self.path

    def create(self) -> None:
        self.created = True  # from here a failure removes it
        self.book.begin()
