"""``clone-agent status --donor HOST:PORT``: ask a donor what it is cloning (STATUS).

The question travels as a clone would: the same handshake (encrypted unless
``--require-no-ssl``), the same SCRAM authentication, and the same right to ask (a
user with BACKUP_ADMIN, or an anonymous donor). The answer comes from the donor's
:class:`engine.metrics.DonorStats` and is checked here like any other message from
the network: known keys, the right types, printable text of bounded length, a bounded
list of stage events. Runs in the command-line process; blocks until the answer or the
connect timeout.
"""

from __future__ import annotations

from typing import Any

from engine.config import CloneConfig
from engine.errors import ProtocolError
from engine.messages import printable
from engine.transport import tcp_url
from recipient.transfer import Security, Timeouts, Transfer

MAX_STAGES = 16
_COUNTERS = ("com_clone", "data_bytes", "network_bytes", "streams", "auth_failures")
_CLONE_TEXT = ("user", "recipient", "state", "begin_time", "end_time", "error_message")


def donor_status(host: str, port: int, security: Security, timeout: float = 10.0
                 ) -> dict[str, Any]:
    """The donor's view: ``{"clone": {...} | None, "stages": [...], "com_clone": N,
    "clones": {"completed": N, "failed": N}, ...}``."""
    where = f"{host}:{port}"
    t = Transfer(tcp_url(host, port), CloneConfig(), Timeouts(connect=timeout),
                 lambda *a: None, security, where)
    try:
        from engine.transport import probe

        probe(host, port, timeout)
        body = t.ask_status()
    finally:
        t.close()
    return _checked(body)


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise ProtocolError(f"STATUS {key} is not a count")
    return value


def _checked(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {key: _int(body, key) for key in _COUNTERS}
    clones = body.get("clones")
    if not isinstance(clones, dict):
        raise ProtocolError("STATUS clones is not an object")
    out["clones"] = {k: _int(clones, k) for k in ("completed", "failed")}
    clone = body.get("clone")
    if clone is not None:
        if not isinstance(clone, dict):
            raise ProtocolError("STATUS clone is not an object")
        view: dict[str, Any] = {"id": _int(clone, "id"), "error_no": _int(clone, "error_no")}
        for key in _CLONE_TEXT:
            value = clone.get(key)
            if value is not None and not isinstance(value, str):
                raise ProtocolError(f"STATUS clone {key} is not text")
            view[key] = printable(value) if value is not None else None
        clone = view
    out["clone"] = clone
    stages = body.get("stages")
    if not isinstance(stages, list) or len(stages) > MAX_STAGES:
        raise ProtocolError("STATUS stages is not a short list")
    out["stages"] = []
    for ev in stages:
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
            raise ProtocolError("STATUS stage event malformed")
        out["stages"].append({"event": printable(ev["event"]),
                              "stage": printable(str(ev.get("stage", ""))),
                              "work_completed": _int(ev, "work_completed"),
                              "work_estimated": _int(ev, "work_estimated")})
    return out
