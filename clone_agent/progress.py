"""What the user sees while a clone runs: live rows on a terminal, plain lines otherwise,
or NDJSON.

Events are dicts from :mod:`recipient.client` (``stage``, ``progress``, ``status``,
``warning``). The
:class:`Reporter` adds what a person needs to read them, the same in every form:
``elapsed`` (seconds since the clone began), ``percent`` of the stage's estimate, and
``eta`` (seconds left, or null while there is no honest guess). With ``--json`` each
event is one line on stdout; otherwise the lines go to stderr (live rows when stderr is
a terminal: one per stage and one overall). Sizes are in binary units everywhere (KiB,
MiB, GiB; speeds in MiB/s), as MySQL's clone variables count them.

The ETA divides what is left by a smoothed rate (an exponentially weighted average
with a time constant of :data:`ETA_TAU` seconds), not by the last sample: a stream
that stalls for a second, or a burst of sparse blocks, does not make it jump.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import orjson

ETA_TAU = 5.0  #: seconds: the time constant of the smoothed rate behind the ETA
ETA_WARMUP = 1.0  #: seconds of samples before an ETA is shown at all
COPY_STAGES = ("FILE COPY", "PAGE COPY", "REDO COPY")  #: the stages that move the data


def human(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``42.0 MiB``, ``1.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Eta:
    """A smoothed rate and the time left at it, for one stage. Fed (time, bytes done)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self._last: tuple[float, int] = (t0, 0)
        self.rate: float | None = None  #: bytes per second, smoothed

    def sample(self, t: float, done: int) -> None:
        t_last, d_last = self._last
        dt = t - t_last
        if dt <= 0:
            return
        inst = max(done - d_last, 0) / dt
        if self.rate is None:
            self.rate = inst
        else:
            alpha = 1.0 - math.exp(-dt / ETA_TAU)
            self.rate += alpha * (inst - self.rate)
        self._last = (t, done)

    def left(self, t: float, done: int, total: int) -> float | None:
        """Seconds left, or None: no estimate, too early, or nothing moving."""
        if total <= 0 or self.rate is None or t - self.t0 < ETA_WARMUP:
            return None
        if done >= total:
            return 0.0
        if self.rate <= 0:
            return None
        return (total - done) / self.rate


def percent(done: int, total: int) -> float | None:
    return round(min(100.0, 100.0 * done / total), 1) if total > 0 else None


class Reporter:
    """Called with each event of a clone, in the command-line process; :meth:`close`
    ends the live display (the caller owns it and closes it, also on failure)."""

    def __init__(self, json_mode: bool, err: TextIO | None = None,
                 out: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.err = err or sys.stderr
        self.out = out or sys.stdout
        self.tty = self.err.isatty() and not json_mode
        self.started = time.monotonic()
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._etas: dict[str, Eta] = {}
        self._done: dict[str, tuple[int, int]] = {}  #: copy stage: (data, estimate)
        self._last_plain = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        event = self.enrich(event)
        if self.json_mode:
            self.out.write(orjson.dumps(event).decode() + "\n")
            self.out.flush()
            return
        line = ""
        if event.get("event") == "warning":  # what the copy does not hold: always said
            line = f"warning: {event['path']}: {event['message']}"
        elif event.get("event") == "restart":  # a network failure: always said
            line = (f"network: connection lost in {event['stage']} ({event['error']}); "
                    f"reconnecting for up to {event['window_s']:g} s"
                    if event.get("phase") == "lost" else
                    f"network: resumed {event['stage']} after {event['outage_s']:g} s "
                    f"(restart {event['restarts']}, {event['resent']} blocks sent again)")
        if line:
            if self._progress is not None:
                self._progress.console.print(line, markup=False, highlight=False)
            else:
                self.err.write(line + "\n")
        elif self.tty:
            self._rich(event)
        else:
            self._plain(event)
        self.err.flush()

    def enrich(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event with ``elapsed``, and for stages and progress ``percent`` and ``eta``."""
        now = time.monotonic()
        kind, stage = event.get("event"), event.get("stage")
        out = {**event, "elapsed": round(now - self.started, 3)}
        if kind not in ("stage", "progress") or not stage:
            return out
        done, total = int(event.get("data") or 0), int(event.get("estimate") or 0)
        if stage in COPY_STAGES:
            self._done[stage] = (done, max(total, done))
        eta = self._etas.get(stage)
        if eta is None or (kind == "stage" and event.get("state") == "In Progress"):
            eta = self._etas[stage] = Eta(now)
        eta.sample(now, done)
        finished = kind == "stage" and event.get("state") != "In Progress"
        out["percent"] = 100.0 if finished and event.get("state") == "Completed" \
            else percent(done, total)
        out["eta"] = 0.0 if finished else _round(eta.left(now, done, total))
        return out

    def overall(self) -> tuple[int, int]:
        """(bytes moved, bytes estimated) over the copy stages begun so far."""
        return (sum(d for d, _ in self._done.values()),
                sum(e for _, e in self._done.values()))

    # -- plain lines ------------------------------------------------------------------
    def _plain(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "stage" and event.get("state") == "In Progress":
            self.err.write(f"{event['stage']}: started, estimate {human(event['estimate'])}\n")
        elif kind == "stage":
            took = _stage_seconds(event)
            self.err.write(f"{event['stage']}: {event['state']}  {human(event['data'])} in "
                           f"{took:.1f} s ({human(event['data_speed'])}/s)\n")
            if event["stage"] in COPY_STAGES:
                self.err.write(self._overall_line(event["elapsed"]) + "\n")
        elif kind == "progress" and time.monotonic() - self._last_plain >= 1.0:
            self._last_plain = time.monotonic()
            self.err.write(f"{event['stage']}: {_pct(event['percent'])}  "
                           f"{human(event['data'])} of {human(event['estimate'])}  "
                           f"{human(event['data_speed'])}/s  elapsed "
                           f"{duration(event['elapsed'])}  ETA {duration(event['eta'])}  "
                           f"streams {event['threads']}\n")

    def _overall_line(self, elapsed: float) -> str:
        done, total = self.overall()
        return (f"overall: {_pct(percent(done, total))}  {human(done)} of {human(total)}  "
                f"elapsed {duration(elapsed)}")

    # -- the live display -------------------------------------------------------------
    def _rich(self, event: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        if self._progress is None:
            # on stderr, as docs/cli.md says (rich's default console is stdout, which
            # --json and scripts own)
            self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(),
                                      TextColumn("{task.fields[info]}"), transient=False,
                                      console=Console(file=self.err))
            self._progress.start()
            self._tasks["overall"] = self._progress.add_task("overall", total=1, info="")
        stage = event.get("stage")
        if event.get("event") not in ("stage", "progress") or not stage:
            return
        total = max(int(event.get("estimate") or 0), int(event.get("data") or 0), 1)
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._progress.add_task(stage, total=total, info="")
        done = total if event.get("percent") == 100.0 else int(event.get("data") or 0)
        if not event.get("estimate") and not event.get("data"):  # DROP DATA: no bytes
            info = str(event.get("state") or "")
        else:
            info = (f"{_pct(event.get('percent'))}  {human(done)} of {human(total)}  "
                    f"{human(event.get('data_speed') or 0)}/s  "
                    f"ETA {duration(event.get('eta'))}")
        self._progress.update(task, completed=done, total=total, info=info)
        moved, estimated = self.overall()
        self._progress.update(self._tasks["overall"], completed=moved,
                              total=max(estimated, 1),
                              info=f"{_pct(percent(moved, estimated))}  {human(moved)}  "
                              f"elapsed {duration(event['elapsed'])}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_line(summary: dict[str, Any]) -> str:
    """The last line of a clone: ``N GiB in T s (R MiB/s)``, over the copy stages' data
    and the whole clone's time (from clone_status's begin and end)."""
    from datetime import datetime

    total = sum(row["data"] for row in summary["clone_progress"] if row["stage"] in COPY_STAGES)
    st = summary["clone_status"]
    try:
        secs = (datetime.fromisoformat(st["end_time"])
                - datetime.fromisoformat(st["begin_time"])).total_seconds()
    except (TypeError, ValueError, KeyError):
        secs = 0.0
    rate = total / secs if secs > 0 else 0.0
    return f"{human(total)} in {secs:.1f} s ({human(rate)}/s)"


def _stage_seconds(event: dict[str, Any]) -> float:
    from datetime import datetime

    try:
        return (datetime.fromisoformat(event["end_time"])
                - datetime.fromisoformat(event["begin_time"])).total_seconds()
    except (TypeError, ValueError, KeyError):
        return 0.0


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{value:5.1f}%"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
