"""Where a clone lands: a new directory (MySQL's DATA DIRECTORY), and its status.

A :class:`Destination` is owned by the recipient's coordinator. It checks the path
before anything is created, creates the directory, keeps the status book (under
``DIR/#clone/`` while the clone runs, and in the recipient's state directory), and
ends in exactly one of :meth:`commit` or :meth:`abort`. ``abort`` removes everything
the clone created, also when the destination's file system is full or read-only: the
status moves to the state directory first, so that nothing more is written under the
destination, and a status write that fails never stops the removal.

Replace mode (an existing data directory swapped in place) is a second kind of
destination with the same steps: :class:`recipient.replace.ReplaceDestination`.

The steps, in the order a pull calls them: ``check(earlier)`` (every problem, raised
together with ``earlier``, the donor list's), ``create()``, ``attach_status()``,
``admit(cfg)`` once the donor's CONFIG is known, the copy into ``root``, then
``commit()`` or ``abort(err)``; ``with_pending(err)`` joins a failure before ``admit``
to problems a destination kept for it, and ``report()`` adds to the summary.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from engine import messages as M
from engine.errors import (
    CloneError,
    DatabaseExists,
    LocalIOError,
    UsageError,
    from_oserror,
    raise_all,
)
from engine.fsutil import remove_tree
from engine.status import StatusBook

log = logging.getLogger("clone_agent.recipient")

MAX_PATH = 4000  #: bytes in a destination's path, leaving room for the names below it


def check_new_directory(path: str) -> str:
    """MySQL's DATA DIRECTORY rules: absolute, not existing, parent existing."""
    if not os.path.isabs(path):
        raise UsageError(f"Incorrect DATA DIRECTORY value: '{path}'",
                         hint="give an absolute path, e.g. /var/lib/clone/new")
    path = os.path.normpath(path)
    if len(os.fsencode(path)) > MAX_PATH:
        raise UsageError(f"Incorrect DATA DIRECTORY value: '{path[:60]}...' (too long)")
    if os.path.lexists(path):
        raise DatabaseExists(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise LocalIOError(f"the parent directory '{parent}' of the DATA DIRECTORY does not exist",
                           hint="create the parent first; the clone creates only the last part")
    return path


class Destination:
    """A new directory at ``path`` (checked by :meth:`check`, made by :meth:`create`)."""

    def __init__(self, path: str, book: StatusBook) -> None:
        self.path = path
        self.book = book
        self.created = False

    def check(self, earlier: list[CloneError]) -> None:
        """Every rule, before anything is created (a refusal leaves no trace); raises
        its problem together with ``earlier``'s."""
        problems = list(earlier)
        try:
            self.path = check_new_directory(self.path)
        except CloneError as err:
            problems += err.each()
        raise_all(problems)
        self.book.status.destination = self.path

    def admit(self, cfg: M.Config) -> None:
        """Nothing more to check once the donor is known: a disk too small fails at the
        first preallocation, before any block."""

    def with_pending(self, err: CloneError) -> CloneError:
        return err

    def report(self) -> dict[str, Any]:
        return {}

    def create(self) -> None:
        try:
            os.mkdir(self.path, 0o750)
        except FileExistsError:
            raise DatabaseExists(self.path) from None
        except OSError as exc:
            raise from_oserror(exc, f"creating {self.path}") from None
        self.created = True
        self.book.begin()  # In Progress, error 1317, durable from the first save

    def attach_status(self) -> None:
        """From here the status lives under ``DIR/#clone/`` too (durable: a crash
        leaves "In Progress", error 1317, for `status`)."""
        self.book.attach(self.path)

    @property
    def root(self) -> str:
        """Where the clone's files are written."""
        return self.path

    def commit(self) -> None:
        self.book.complete()

    def abort(self, err: CloneError) -> None:
        """Remove what the clone created; the status, Failed with ``err``, stays in the
        state directory. Never raises: what cannot be done is logged."""
        self.book.detach()  # nothing more under a destination that may be full
        try:
            self.book.fail(err)
        except OSError as exc:
            log.error("could not record the failure: %s", exc)
        if self.created:
            try:
                remove_tree(self.path)
            except OSError as exc:
                log.error("could not remove %s: %s", self.path, exc)
