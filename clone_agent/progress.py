"""What the user sees while a clone runs: rich on a terminal, plain lines otherwise, or NDJSON.

Events are dicts from :mod:`recipient.client` (``stage``, ``progress``, ``status``,
``warning``).
With ``--json`` each is one line of JSON on stdout; otherwise stage changes and
progress go to stderr (a live rich display when stderr is a terminal).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    def __init__(self, json_mode: bool, err: TextIO | None = None,
                 out: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.err = err or sys.stderr
        self.out = out or sys.stdout
        self.tty = self.err.isatty() and not json_mode
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._last_plain = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.json_mode:
            self.out.write(orjson.dumps(event).decode() + "\n")
            self.out.flush()
            return
        kind = event.get("event")
        if kind == "warning":  # what the copy does not hold: always said, on stderr
            line = f"warning: {event['path']}: {event['message']}"
            if self._progress is not None:
                self._progress.console.print(line, markup=False, highlight=False)
            else:
                self.err.write(line + "\n")
        elif self.tty:
            self._rich(kind, event)
        elif kind == "stage" and event.get("state") not in ("In Progress", "Not Started"):
            self.err.write(f"{event['stage']}: {event['state']}  {human(event['data'])}  "
                           f"({human(event['data_speed'])}/s)\n")
        elif kind == "stage":
            self.err.write(f"{event['stage']}: started, estimate {human(event['estimate'])}\n")
        elif kind == "progress" and time.monotonic() - self._last_plain >= 1.0:
            self._last_plain = time.monotonic()
            est = event["estimate"] or 1
            self.err.write(f"{event['stage']}: {100 * event['data'] / est:5.1f}%  "
                           f"{human(event['data'])} of {human(event['estimate'])}  "
                           f"{human(event['data_speed'])}/s  streams {event['threads']}\n")
        self.err.flush()

    def _rich(self, kind: Any, event: dict[str, Any]) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(),
                                      DownloadColumn(binary_units=True),
                                      TransferSpeedColumn(), transient=False)
            self._progress.start()
        stage = event.get("stage")
        if kind in ("stage", "progress") and stage:
            task = self._tasks.get(stage)
            if task is None:
                task = self._tasks[stage] = self._progress.add_task(
                    stage, total=max(event.get("estimate") or 0, 1))
            total = max(event.get("estimate") or 0, event.get("data", 0), 1)
            self._progress.update(task, completed=event.get("data", 0), total=total)
            if kind == "stage" and event.get("state") == "Completed":
                self._progress.update(task, completed=total, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
