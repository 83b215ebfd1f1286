"""What a donor or a recipient counts, and its Prometheus exposition (``--metrics-addr``).

Two plain objects hold the counts, updated by the process's own loop and never by a
worker: :class:`DonorStats` by small hooks in donor/server.py, donor/session.py and
donor/gate.py, :class:`RecipientStats` from the clone's events (the same ones the
progress display reads), so the recipient's code has no hook at all. They cost a few
integer additions per block, with or without ``--metrics-addr``, and import nothing.

:func:`serve_metrics` starts prometheus_client's HTTP server on a thread of the
command-line process; at each scrape a collector reads the stats object (plain ints
and a short list, read under the GIL: a scrape sees each value as it was at some
instant, which is what a Prometheus scrape means anyway). The names
(``clone_agent_..._total`` for counters) are listed in docs/metrics.md.

MySQL's names are kept where there is one: ``Com_clone`` (clones served) and the
performance_schema stage events ``stage/clone (file copy)``, ``(page copy)`` and
``(redo copy)``, with WORK_COMPLETED / WORK_ESTIMATED in blocks, pages and redo blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STAGES = ("DROP DATA", "FILE COPY", "PAGE COPY", "REDO COPY", "FILE SYNC", "RESTART", "RECOVERY")
COPY_STAGES = ("FILE COPY", "PAGE COPY", "REDO COPY")
#: performance_schema's stage event names, as MySQL's donor reports them
STAGE_EVENTS = {"FILE COPY": "stage/clone (file copy)", "PAGE COPY": "stage/clone (page copy)",
                "REDO COPY": "stage/clone (redo copy)"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class StageEvent:
    """One stage of the donor's clone: work in blocks (file and redo copy) or pages."""

    stage: str
    work_estimated: int
    work_completed: int = 0

    def public(self) -> dict[str, Any]:
        return {"event": STAGE_EVENTS.get(self.stage, self.stage), "stage": self.stage,
                "work_completed": self.work_completed, "work_estimated": self.work_estimated}


@dataclass
class DonorStats:
    """The donor's counts, owned by its coordinator loop (donor/server.py)."""

    com_clone: int = 0  #: clones begun (MySQL's Com_clone)
    results: dict[str, int] = field(default_factory=lambda: {"completed": 0, "failed": 0})
    data_bytes: int = 0  #: bytes of data sent (before compression)
    network_bytes: int = 0  #: bytes of blocks on the wire (after compression, sealed)
    #: failed authentications so far: donor/gate.py counts them, this reads them
    auth_failures: Callable[[], int] = lambda: 0
    streams: int = 0
    #: the running or last clone: id, user, recipient, state, times, error
    clone: dict[str, Any] = field(default_factory=dict)
    stages: list[StageEvent] = field(default_factory=list)

    def stage(self, clone_id: int, name: str, work_estimated: int) -> None:
        """A snapshot state begins; the first of a clone begins the clone's record."""
        if self.clone.get("id") != clone_id:
            self.com_clone += 1
            self.clone = {"id": clone_id, "user": "", "recipient": "", "state": "In Progress",
                          "begin_time": _now(), "end_time": None, "error_no": 0,
                          "error_message": ""}
            self.stages = []
            self.streams = 1  # the master; ATTACH adds the others
        self.stages.append(StageEvent(name, work_estimated))

    def who(self, clone_id: int, user: str, recipient: str) -> None:
        if self.clone.get("id") == clone_id:
            self.clone.update(user=user, recipient=recipient)

    def work(self, units: int) -> None:
        if self.stages:
            self.stages[-1].work_completed += units

    def sent(self, raw: int, wire: int) -> None:
        self.data_bytes += raw
        self.network_bytes += wire

    def end(self, clone_id: int, ok: bool, error_no: int = 0, error_message: str = "") -> None:
        """The clone ended; the first call for a clone counts, later ones do nothing."""
        if self.clone.get("id") != clone_id or self.clone.get("state") != "In Progress":
            return
        result = "completed" if ok else "failed"
        self.results[result] += 1
        self.streams = 0
        self.clone.update(state="Completed" if ok else "Failed", end_time=_now(),
                          error_no=error_no, error_message=error_message)

    def view(self) -> dict[str, Any]:
        """What ``status --donor`` shows: the running or last clone and the counters."""
        return {"clone": dict(self.clone) or None,
                "stages": [st.public() for st in self.stages],
                "com_clone": self.com_clone, "clones": dict(self.results),
                "data_bytes": self.data_bytes, "network_bytes": self.network_bytes,
                "streams": self.streams, "auth_failures": self.auth_failures()}


@dataclass
class RecipientStats:
    """The recipient's counts, fed with the clone's events (:meth:`observe`) in the
    command-line process."""

    results: dict[str, int] = field(default_factory=lambda: {"completed": 0, "failed": 0})
    data_bytes: int = 0
    network_bytes: int = 0
    streams: int = 0
    stage: str = ""  #: the running stage, "" between clones
    work: dict[str, tuple[int, int]] = field(default_factory=dict)  #: stage: (done, estimate)
    _seen: dict[str, tuple[int, int]] = field(default_factory=dict)  #: stage: (data, network)

    def observe(self, event: dict[str, Any]) -> None:
        kind, name = event.get("event"), event.get("stage")
        if kind not in ("stage", "progress") or not name:
            return
        data, network = int(event.get("data") or 0), int(event.get("network") or 0)
        self.work[name] = (data, int(event.get("estimate") or 0))
        if event.get("threads"):
            self.streams = int(event["threads"])
        if name in COPY_STAGES:  # FILE SYNC and RECOVERY move no bytes of their own
            d0, n0 = self._seen.get(name, (0, 0))
            self.data_bytes += max(data - d0, 0)
            self.network_bytes += max(network - n0, 0)
            self._seen[name] = (max(data, d0), max(network, n0))
        if kind == "stage":
            self.stage = name if event.get("state") == "In Progress" else ""

    def end(self, ok: bool) -> None:
        self.results["completed" if ok else "failed"] += 1
        self.stage, self.streams = "", 0


# -- the exposition -------------------------------------------------------------------


def _families(stats: DonorStats | RecipientStats, role: str) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    info = GaugeMetricFamily("clone_agent_info", "this process's role", labels=["role"])
    info.add_metric([role], 1)
    yield info
    clones = CounterMetricFamily("clone_agent_clones", "clones ended, by result",
                                 labels=["result"])
    for result, n in stats.results.items():
        clones.add_metric([result], n)
    yield clones
    yield CounterMetricFamily("clone_agent_data_bytes", "bytes of data cloned (before "
                              "compression)", value=stats.data_bytes)
    yield CounterMetricFamily("clone_agent_network_bytes", "bytes of clone data on the "
                              "network (after compression)", value=stats.network_bytes)
    yield GaugeMetricFamily("clone_agent_streams", "streams of the running clone",
                            value=stats.streams)
    running = GaugeMetricFamily("clone_agent_stage", "1 for the running stage, else 0",
                                labels=["stage"])
    unit = "blocks or pages" if role == "donor" else "bytes"
    done = GaugeMetricFamily("clone_agent_stage_work_completed",
                             f"work completed in the stage ({unit})", labels=["stage"])
    estimated = GaugeMetricFamily("clone_agent_stage_work_estimated",
                                  f"work estimated for the stage ({unit})", labels=["stage"])
    for name, current, work in _stage_rows(stats):
        running.add_metric([name], 1 if current else 0)
        if work is not None:
            done.add_metric([name], work[0])
            estimated.add_metric([name], work[1])
    yield running
    yield done
    yield estimated
    if isinstance(stats, DonorStats):
        yield CounterMetricFamily("clone_agent_auth_failures", "failed authentications "
                                  "(a wrong password or an unknown user)",
                                  value=stats.auth_failures())
        yield CounterMetricFamily("clone_agent_com_clone", "clones begun (MySQL's "
                                  "Com_clone)", value=stats.com_clone)


def _stage_rows(stats: DonorStats | RecipientStats
                ) -> Iterable[tuple[str, bool, tuple[int, int] | None]]:
    if isinstance(stats, DonorStats):
        events = {st.stage: st for st in stats.stages}
        in_progress = stats.clone.get("state") == "In Progress"
        last = stats.stages[-1].stage if stats.stages else ""
        for name in STAGES:
            ev = events.get(name)
            yield (name, in_progress and name == last,
                   (ev.work_completed, ev.work_estimated) if ev is not None else None)
    else:
        for name in STAGES:
            yield name, name == stats.stage, stats.work.get(name)


class _Collector:
    def __init__(self, stats: DonorStats | RecipientStats, role: str) -> None:
        self.stats = stats
        self.role = role

    def collect(self) -> Iterator[Any]:
        return _families(self.stats, self.role)


@contextmanager
def serve_metrics(host: str, port: int, stats: DonorStats | RecipientStats,
                  role: str) -> Iterator[Callable[[], int]]:
    """Serve ``http://host:port/metrics`` on a thread until the block ends; yields a
    function giving the port (0 in ``port`` picks a free one). Raises OSError when the
    address cannot be had; the caller translates it."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, role))  # type: ignore[arg-type]
    server, thread = start_http_server(port, addr=host, registry=registry)
    try:
        yield lambda: int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
