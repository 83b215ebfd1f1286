"""clone_status and clone_progress: the model, kept durably under ``DIR/#clone/``.

``#clone/#view_status`` and ``#clone/#view_progress`` (JSON) are rewritten atomically
(temporary name, rename) at each stage change and at most once a second in between;
durably (with fsync) when the clone begins and when it ends, so that after a crash
they read as interrupted or as what the clone ended as. Between those, a stage change
is not worth a disk flush: the flushes would sit on the clone's path, and a crash is
read from the begin record anyway. While a clone runs, the error fields hold 1317
"Query execution was interrupted", as MySQL does, so that a crashed clone reads as
interrupted.

A clone into a new directory that fails removes the directory, ``#clone/`` with it
(nothing of a half clone stays). Its final status is then kept where MySQL keeps it,
with the recipient rather than the destination: a record in the state directory
(the command line picks it: ``CLONE_AGENT_STATE_DIR``, else ``$XDG_STATE_HOME/clone-agent``,
else ``~/.local/state/clone-agent``), keyed by the destination's absolute path, which
``status DIR`` reads when ``DIR/#clone/`` is gone, and ``status`` lists. The state
directory keeps the last :data:`HISTORY` records; older ones are pruned when a clone
begins, as MySQL keeps one row in clone_status and not an ever-growing log.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.errors import CloneError, NoStatus, QueryInterrupted
from engine.fsutil import write_durable

STAGES = ("DROP DATA", "FILE COPY", "PAGE COPY", "REDO COPY", "FILE SYNC", "RESTART", "RECOVERY")
NOT_STARTED, IN_PROGRESS, COMPLETED, FAILED = "Not Started", "In Progress", "Completed", "Failed"
STATUS_DIR = "#clone"
STATUS_FILE = "#view_status"
PROGRESS_FILE = "#view_progress"
MAX_WARNINGS = 1000  #: warnings listed in clone_status (all are counted)
HISTORY = 50  #: records kept in the state directory, the newest


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class StageProgress:
    id: int
    stage: str
    state: str = NOT_STARTED
    begin_time: str | None = None
    end_time: str | None = None
    threads: int = 0
    estimate: int = 0
    data: int = 0
    network: int = 0
    data_speed: int = 0
    network_speed: int = 0
    # Not persisted: the last sample, for current speeds.
    _t0: float = field(default=0.0, repr=False)
    _sample: tuple[float, int, int] = field(default=(0.0, 0, 0), repr=False)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class CloneStatus:
    id: int = 1
    pid: int = 0
    state: str = NOT_STARTED
    begin_time: str | None = None
    end_time: str | None = None
    source: str = ""
    destination: str = ""
    error_no: int = 0
    error_message: str = ""
    binlog_file: str = ""
    binlog_position: int = 0
    gtid_executed: str = ""
    encrypted: bool = False  #: the clone's streams and blocks were encrypted
    donor_key: str = ""  #: the donor key's fingerprint (SHA256:...), when encrypted
    #: what the clone could not reproduce, and files that changed while read: the
    #: first MAX_WARNINGS of them ({"kind", "path", "message"}), and how many in all
    warnings: list[dict[str, str]] = field(default_factory=list)
    warning_count: int = 0
    restarts: int = 0  #: network failures the clone resumed from (or tried to)


def _record_path(state_dir: str, destination: str) -> str:
    key = hashlib.sha1(os.path.abspath(destination).encode()).hexdigest()[:16]
    return os.path.join(state_dir, f"clone-{key}.json")


class StatusBook:
    """The status and progress of one clone, owned by the recipient's coordinator."""

    def __init__(self, source: str, destination: str, state_dir: str | None = None) -> None:
        self.status = CloneStatus(pid=os.getpid(), source=source, destination=destination)
        self.progress = [StageProgress(i + 1, name) for i, name in enumerate(STAGES)]
        self.dir: str | None = None
        self.state_dir = state_dir
        self._last_save = 0.0
        #: stages whose row a connection borrows without doing their work (replace
        #: mode's DROP DATA, which comes after the swap): they end Not Started
        self._borrowed: set[str] = set()
        #: called with a stage's name as it begins (a pull's kill points, for tests)
        self.on_begin: Callable[[str], None] | None = None

    # -- the model --------------------------------------------------------------------
    def stage(self, name: str) -> StageProgress:
        return self.progress[STAGES.index(name)]

    def begin(self) -> None:
        if self.state_dir is not None:
            prune_history(self.state_dir, HISTORY - 1)  # room for this clone's record
        interrupted = QueryInterrupted()
        self.status.state = IN_PROGRESS
        self.status.begin_time = now_iso()
        self.status.error_no = interrupted.errno
        self.status.error_message = interrupted.message

    def begin_stage(self, name: str, estimate: int = 0, threads: int = 1) -> StageProgress:
        st = self.stage(name)
        st.state = IN_PROGRESS
        st.begin_time = now_iso()
        st.estimate = estimate
        st.threads = threads
        st._t0 = time.monotonic()
        st._sample = (st._t0, 0, 0)
        self.save(force=True)
        if self.on_begin is not None and name not in self._borrowed:
            self.on_begin(name)
        return st

    def borrow(self, name: str) -> None:
        """``name``'s row is used for a step that is not its work (until
        :meth:`give_back`): it shows In Progress and Failed as usual, but ends Not
        Started, with no times or counters, so that the real work counts alone."""
        self._borrowed.add(name)

    def give_back(self, name: str) -> None:
        self._borrowed.discard(name)

    def update(self, name: str, data: int, network: int, threads: int | None = None) -> None:
        st = self.stage(name)
        st.data, st.network = data, network
        if threads is not None:
            st.threads = threads
        t = time.monotonic()
        t0, d0, n0 = st._sample
        if t - t0 >= 0.5:
            st.data_speed = int((data - d0) / (t - t0))
            st.network_speed = int((network - n0) / (t - t0))
            st._sample = (t, data, network)
        self.save()

    def end_stage(self, name: str, state: str = COMPLETED) -> None:
        st = self.stage(name)
        if name in self._borrowed and state == COMPLETED:
            fresh = StageProgress(st.id, st.stage)
            self.progress[STAGES.index(name)] = fresh
            self.save(force=True)
            return
        if st.state == NOT_STARTED and state == COMPLETED:
            st.begin_time = now_iso()
            st._t0 = time.monotonic()
        st.state = state
        st.end_time = now_iso()
        elapsed = max(time.monotonic() - st._t0, 1e-6)
        if state == COMPLETED:
            st.data_speed = int(st.data / elapsed)
            st.network_speed = int(st.network / elapsed)
        self.save(force=True)

    def running_stage(self) -> str | None:
        for st in self.progress:
            if st.state == IN_PROGRESS:
                return st.stage
        return None

    def fail(self, err: CloneError) -> None:
        running = self.running_stage()
        if running is not None:
            self.end_stage(running, FAILED)
        self.status.state = FAILED
        self.status.end_time = now_iso()
        self.status.error_no = err.errno
        self.status.error_message = err.message
        self.save(force=True, durable=True)

    def warn(self, warning: dict[str, str]) -> bool:
        """Count a warning, and list it while the list is short; True when listed."""
        st = self.status
        st.warning_count += 1
        if len(st.warnings) >= MAX_WARNINGS:
            return False
        st.warnings.append(warning)
        self.save()
        return True

    def complete(self) -> None:
        self.status.state = COMPLETED
        self.status.end_time = now_iso()
        self.status.error_no = 0
        self.status.error_message = ""
        self.save(force=True, durable=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clone_status": asdict(self.status),
            "clone_progress": [st.public() for st in self.progress],
        }

    # -- persistence --------------------------------------------------------------------
    def attach(self, destination_dir: str) -> None:
        """Start persisting under ``destination_dir/#clone/`` (created here)."""
        self.dir = os.path.join(destination_dir, STATUS_DIR)
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        self.save(force=True, durable=True)

    def detach(self) -> None:
        """Stop writing under the destination (it is about to be removed)."""
        self.dir = None

    def save(self, force: bool = False, durable: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self._last_save < 1.0:
            return
        self._last_save = t
        data = self.as_dict()
        if self.dir is not None and os.path.isdir(self.dir):
            write_durable(os.path.join(self.dir, STATUS_FILE),
                          orjson.dumps(data["clone_status"], option=orjson.OPT_INDENT_2),
                          durable)
            write_durable(os.path.join(self.dir, PROGRESS_FILE),
                          orjson.dumps(data["clone_progress"], option=orjson.OPT_INDENT_2),
                          durable)
        if self.state_dir is not None and (force or self.dir is None):
            os.makedirs(self.state_dir, exist_ok=True)
            write_durable(_record_path(self.state_dir, self.status.destination),
                          orjson.dumps(data), durable)


def _read_dir(destination: str) -> dict[str, Any] | None:
    base = os.path.join(os.path.abspath(destination), STATUS_DIR)
    try:
        with open(os.path.join(base, STATUS_FILE), "rb") as fh:
            status = orjson.loads(fh.read())
        with open(os.path.join(base, PROGRESS_FILE), "rb") as fh:
            progress = orjson.loads(fh.read())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return {"clone_status": status, "clone_progress": progress}


def _read_record(destination: str, state_dir: str | None) -> dict[str, Any] | None:
    if state_dir is None:
        return None
    try:
        with open(_record_path(state_dir, destination), "rb") as fh:
            data: dict[str, Any] = orjson.loads(fh.read())
    except FileNotFoundError:
        return None
    return data


def read_status(destination: str, state_dir: str | None) -> dict[str, Any]:
    """What ``status DIR`` shows: the later of ``DIR/#clone/`` and the recipient's record
    (``DIR/#clone/`` when they began together). The record can be the later one where
    ``DIR`` stays: a replace refused after it reached the donor (no space) records its
    failure there, and leaves ``DIR`` and the last clone's status in it as they were."""
    in_dir = _read_dir(destination)
    record = _read_record(destination, state_dir)
    if in_dir is not None and record is not None:
        began = in_dir["clone_status"].get("begin_time") or ""
        return record if (record["clone_status"].get("begin_time") or "") > began \
            else in_dir
    found = in_dir or record
    if found is None:
        raise NoStatus(destination)
    return found


def note_settled(datadir: str, forward: bool) -> None:
    """The status of a replace whose pull died, once the next command has finished its
    swap (``forward``: the clone is in place, Completed) or undone it (Failed; the error
    fields keep the 1317 "Query execution was interrupted" of a running clone)."""
    data = _read_dir(datadir)
    if data is None or data["clone_status"].get("state") != IN_PROGRESS:
        return
    status, progress = data["clone_status"], data["clone_progress"]
    end = now_iso()
    status["state"] = COMPLETED if forward else FAILED
    status["end_time"] = end
    if forward:
        status["error_no"], status["error_message"] = 0, ""
    for row in progress:
        if row.get("state") == IN_PROGRESS:
            row["state"], row["end_time"] = (COMPLETED if forward else FAILED), end
    base = os.path.join(datadir, STATUS_DIR)
    write_durable(os.path.join(base, STATUS_FILE),
                  orjson.dumps(status, option=orjson.OPT_INDENT_2))
    write_durable(os.path.join(base, PROGRESS_FILE),
                  orjson.dumps(progress, option=orjson.OPT_INDENT_2))


def _records(state_dir: str) -> list[tuple[float, str]]:
    """(mtime, path) of every record in the state directory, newest first."""
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith("clone-") and name.endswith(".json"):
            path = os.path.join(state_dir, name)
            try:
                out.append((os.stat(path).st_mtime, path))
            except FileNotFoundError:  # pruned by another clone beginning now
                continue
    return sorted(out, reverse=True)


def prune_history(state_dir: str, keep: int) -> None:
    """Remove all but the ``keep`` newest records (by modification time)."""
    for _, path in _records(state_dir)[keep:]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def list_history(state_dir: str, limit: int = HISTORY) -> list[dict[str, Any]]:
    """The clone_status of the recent clones, newest first; unreadable records skipped
    (one being replaced right now, or damaged: a list is no place to fail)."""
    out = []
    for _, path in _records(state_dir)[:limit]:
        try:
            with open(path, "rb") as fh:
                out.append(orjson.loads(fh.read())["clone_status"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def present(status: dict[str, Any], alive: Callable[[int], bool]) -> dict[str, Any]:
    """clone_status as a user should read it. The stored record of a running clone holds
    1317 so that a crash reads as interrupted; while its process lives, the clone has
    no error yet: 0 and no message, as MySQL's performance_schema.clone_status shows.
    When the process is gone, the clone failed (interrupted, 1317 stays)."""
    out = dict(status)
    if out.get("state") == IN_PROGRESS:
        if out.get("pid") and not alive(int(out["pid"])):
            out["state"] = FAILED
        else:
            out["error_no"], out["error_message"] = 0, ""
    return out
