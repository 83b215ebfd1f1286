"""Kill points: named places where a test has this process SIGKILL itself.

MySQL's test suite stops a server at a named debug sync point to prove that what a
crash leaves there is finished or undone by the next start. A :class:`KillPoints`
does the same for one process: the command line builds it from a hidden option
(``pull --fault kill_at=POINT``) and passes it in; engine code never reads the
environment. A point is a name (``journal``), or a name and a count (``rename:3``:
right after the third rename), reached by :meth:`KillPoints.reached` and
:meth:`KillPoints.count`. With no point set, both cost one comparison.
"""

from __future__ import annotations

import os
import signal


class KillPoints:
    """``at``: the one point to die at, or None (the default: never)."""

    def __init__(self, at: str | None = None) -> None:
        self.at = at or None
        self._counts: dict[str, int] = {}

    def reached(self, point: str) -> None:
        if self.at is not None and self.at == point:
            # SIGKILL, not an exception or exit: nothing of ours runs after it, no
            # finally, no atexit, exactly as a kill -9 or a power cut would leave it.
            os.kill(os.getpid(), signal.SIGKILL)

    def count(self, name: str) -> None:
        """One more ``name`` step: dies at ``name:N`` on the N-th (N from 1)."""
        if self.at is None:
            return
        n = self._counts.get(name, 0) + 1
        self._counts[name] = n
        self.reached(f"{name}:{n}")


NEVER = KillPoints()
