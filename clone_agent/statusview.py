"""``clone-agent status``: what one clone's status looks like, and the list of recent ones.

Runs in the command-line process only. Rendering is apart from reading (engine/status.py)
so that ``--watch`` can redraw the same text in place on a terminal: it moves the
cursor back over the lines it wrote last time and clears below, rather than clearing
the screen, so the shell's history above stays.
"""

from __future__ import annotations

from typing import Any, TextIO

from clone_agent.progress import human

_FIELDS = ("state", "source", "destination", "begin_time", "end_time", "error_no",
           "error_message", "binlog_file", "binlog_position", "gtid_executed")


def render_one(data: dict[str, Any]) -> str:
    """One clone: clone_status as ``key: value`` lines, then its clone_progress table."""
    st = data["clone_status"]
    lines = [f"{key:>16}: {st.get(key)}" for key in _FIELDS]
    if st.get("resumable_until"):
        lines.append(f"{'':>16}  interrupted: resume it with `clone-agent pull "
                     f"USER@{st.get('source')} --resume {st.get('destination')}` until "
                     f"{st['resumable_until']} (while the donor keeps it)")
    lines.append("")
    lines.append(f"{'STAGE':<10} {'STATE':<11} {'THREADS':>7} {'ESTIMATE':>12} "
                 f"{'DATA':>12} {'NETWORK':>12}")
    for row in data["clone_progress"]:
        lines.append(f"{row['stage']:<10} {row['state']:<11} {row['threads']:>7} "
                     f"{human(row['estimate']):>12} {human(row['data']):>12} "
                     f"{human(row['network']):>12}")
    return "\n".join(lines) + "\n"


def render_list(rows: list[dict[str, Any]]) -> str:
    """The recent clones, newest first: one line each."""
    if not rows:
        return "no clone recorded\n"
    lines = [f"{'STATE':<11} {'BEGIN':<24} {'ERROR':>5}  {'SOURCE':<21} DESTINATION"]
    for st in rows:
        lines.append(f"{st.get('state', '?'):<11} {st.get('begin_time') or '-':<24} "
                     f"{st.get('error_no') or '':>5}  {st.get('source', ''):<21} "
                     f"{st.get('destination', '')}")
    return "\n".join(lines) + "\n"


class Redraw:
    """Writes a block of text; on a terminal the next block replaces the previous one
    (cursor up over its lines, clear to the end), elsewhere it follows it."""

    def __init__(self, out: TextIO, json_mode: bool = False) -> None:
        """``json_mode``: one object a line, each kept (NDJSON), never redrawn."""
        self.out = out
        self.json_mode = json_mode
        self.tty = out.isatty() and not json_mode
        self._lines = 0

    def show(self, text: str) -> None:
        if self.tty and self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")  # CPL n, then ED: erase below
        elif self._lines and not self.json_mode:
            self.out.write("\n")  # plain: blocks apart, one after the other
        self.out.write(text)
        self.out.flush()
        self._lines = text.count("\n")


def render_donor(where: str, view: dict[str, Any]) -> str:
    """``status --donor``: the donor's counters, its running or last clone, and that
    clone's stage events (performance_schema's names and units)."""
    clones = view["clones"]
    lines = [f"donor {where}: Com_clone {view['com_clone']}, completed "
             f"{clones['completed']}, failed {clones['failed']}, authentication failures "
             f"{view['auth_failures']}"]
    clone = view.get("clone")
    if not clone:
        lines.append("no clone yet")
        return "\n".join(lines) + "\n"
    lines.append(f"clone {clone['id']}: {clone['state']}, user '{clone['user']}' from "
                 f"{clone['recipient'] or '?'}, streams {view['streams']}")
    lines.append(f"      begin_time: {clone['begin_time']}")
    lines.append(f"        end_time: {clone['end_time']}")
    if clone["error_no"] or clone["error_message"]:
        lines.append(f"           error: {clone['error_no']} {clone['error_message']}")
    lines.append("")
    lines.append(f"{'EVENT':<26} {'WORK_COMPLETED':>15} {'WORK_ESTIMATED':>15}")
    for ev in view["stages"]:
        lines.append(f"{ev['event']:<26} {ev['work_completed']:>15} {ev['work_estimated']:>15}")
    return "\n".join(lines) + "\n"
