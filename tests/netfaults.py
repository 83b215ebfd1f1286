"""Real network faults for the restart tests: two network namespaces joined by a veth pair.

``NetFaults`` makes a donor namespace and a recipient namespace (names unique to this
process and harness: ``caf<pid>-<n>d`` / ``...r``), a veth pair made directly inside them
(nothing appears in the caller's namespace), ``10.199.N.1/24`` on the donor's end and
``10.199.N.2/24`` on the recipient's, loopback up in both, and, unless ``rate`` is None,
a tbf qdisc on both ends (``rate RATE burst 256kb latency 50ms``). It then runs
commands in either namespace (``ip netns exec``, each in a process group of its own),
starts ``clone-agent serve`` in the donor's and ``clone-agent pull --json`` in the
recipient's, and makes faults: the link down and up (the recipient's end: traffic stops
both ways), every TCP connection to the donor's port reset (``ss -K``), a process
stopped, continued or killed, the link's rate changed.

On exit it kills the process groups it started and deletes the namespaces it created,
nothing else. ``netfaults`` is the pytest fixture; it skips the test (with the reason)
when not root, when ``ip``, ``tc`` or ``ss`` is missing, or when ``ip netns add`` fails.

Waiting for a peer is never a fixed sleep: ``Pull.wait_event`` waits for an event of the
recipient's ``--json`` stream, ``wait_until`` polls a condition, both with a deadline.
"""

from __future__ import annotations

import itertools
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from tests.helpers import CLI, ROOT

DONOR_PORT = 3310
TRACK_EVERY = 0.05  #: seconds between two looks at a started command's process tree
_counter = itertools.count(1)
_counter_lock = threading.Lock()


class Unavailable(Exception):
    """Network namespaces cannot be made here (the reason is the message)."""


def why_unavailable() -> str | None:
    """None when namespaces can be tried; else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "ss"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2)"
    return None


def wait_until(cond: Callable[[], Any], timeout: float, what: str,
               every: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)  # polling with a deadline, not waiting for a fixed time


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


def _check(*cmd: str) -> None:
    res = _run(*cmd)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")


def group_alive(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of the process group ``pgid``."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _live(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            # is_running compares the start time too: a reused pid is not ours
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


class Proc:
    """A command started in a namespace (a session and process group of its own), and
    every process seen below it: clone-agent's workers run in process groups of their
    own, and outlive a leader killed with SIGKILL for a moment, so the harness records
    them as they appear (``track``, called by the harness's sampler) to signal, wait
    for and end them too."""

    def __init__(self, popen: subprocess.Popen[str], name: str) -> None:
        self.popen = popen
        self.name = name
        self.pgid = popen.pid  # start_new_session: the group is the leader's pid
        self._known: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        try:
            self._known[popen.pid] = psutil.Process(popen.pid)
        except psutil.Error:
            pass
        threading.Thread(target=self._sample, daemon=True, name=f"track {name}").start()

    def _sample(self) -> None:
        while self.popen.poll() is None:
            self.track()
            time.sleep(TRACK_EVERY)  # sampling the process tree while the leader runs

    @property
    def pid(self) -> int:
        return self.popen.pid

    def track(self) -> None:
        """Record the leader's descendants as they are now."""
        leader = self._known.get(self.pid)
        if leader is None or self.popen.poll() is not None:
            return
        try:
            kids = leader.children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            for k in kids:
                self._known.setdefault(k.pid, k)

    def alive(self) -> list[psutil.Process]:
        """The leader and every descendant seen, still running."""
        self.track()
        with self._lock:
            known = list(self._known.values())
        return _live(known)

    def signal(self, sig: int, group: bool = False) -> None:
        """Send ``sig`` to the leader (``group``: to it and every descendant)."""
        if not group:
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass
            return
        for p in self.alive():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def stop(self, group: bool = True) -> None:
        """SIGSTOP, by default to the whole tree (a host that hangs)."""
        self.signal(signal.SIGSTOP, group)

    def cont(self, group: bool = True) -> None:
        self.signal(signal.SIGCONT, group)

    def kill9(self, group: bool = False) -> None:
        """SIGKILL, by default to the leader alone (``kill -9 PID``)."""
        self.signal(signal.SIGKILL, group)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def all_gone(self, timeout: float) -> None:
        """The leader and every process seen below it ended within ``timeout``."""
        wait_until(lambda: not self.alive(), timeout,
                   f"the processes of {self.name} to end")

    def end(self, grace: float = 10) -> None:
        """SIGCONT to the tree and SIGTERM to the leader (a clean stop, which removes
        its shared memory), then SIGKILL to what is left after ``grace``."""
        self.signal(signal.SIGCONT, group=True)
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the workers' exit; bounded
        self.kill_all()

    def kill_all(self) -> None:
        """SIGCONT then SIGKILL to every process of the tree (a stopped one dies too)."""
        for sig in (signal.SIGCONT, signal.SIGKILL):
            self.signal(sig, group=True)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


class Server(Proc):
    """``clone-agent serve`` in the donor namespace; its stderr is collected."""

    def __init__(self, popen: subprocess.Popen[str], address: str) -> None:
        super().__init__(popen, f"serve {address}")
        self.address = address
        self._err: list[str] = []
        self._threads: list[threading.Thread] = []

    def start_readers(self) -> None:
        """Read stdout (drained) and stderr (kept) as they come: a full pipe would stop
        the donor."""
        for stream, sink in ((self.popen.stdout, None), (self.popen.stderr, self._err)):
            t = threading.Thread(target=_read_lines, args=(stream, sink), daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM (after a SIGCONT to its group), and its exit status."""
        self.signal(signal.SIGCONT, group=True)
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
        for t in self._threads:
            t.join(5)
        return self.popen.returncode


def _read_lines(stream: Any, sink: list[str] | None) -> None:
    if stream is None:
        return
    for line in stream:
        if sink is not None:
            sink.append(line)


class Pull(Proc):
    """``clone-agent pull --json`` in the recipient namespace: its events as they come.

    Two threads read stdout (one JSON object a line) and stderr; ``events`` grows as
    lines arrive, each with ``_t``, the monotonic time it was read."""

    def __init__(self, popen: subprocess.Popen[str], dest: Path) -> None:
        super().__init__(popen, f"pull into {dest}")
        self.dest = dest
        self.started = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.ended_at: float | None = None
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            now = time.monotonic()
            with self._cond:
                self.stdout_lines.append(line)
                try:
                    ev = orjson.loads(line)
                except orjson.JSONDecodeError:
                    ev = None
                if isinstance(ev, dict):
                    ev["_t"] = now
                    self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._cond:
                self.stderr_lines.append(line)

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self._cond:
            return next((e for e in self.events if pred(e)), None)

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                   what: str = "an event") -> dict[str, Any]:
        """The first event (already seen or to come) for which ``pred`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ev = next((e for e in self.events if pred(e)), None)
                if ev is not None:
                    return ev
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None
                                 and not self._readers[0].is_alive()):
                    raise AssertionError(
                        f"no {what} within {timeout:g} s (pull exit {self.popen.poll()}); "
                        f"events {[e.get('event') for e in self.events][-12:]}; "
                        f"stderr {self.stderr[-600:]!r}")
                self._cond.wait(min(left, 0.5))

    def wait_stage(self, stage: str, state: str = "In Progress",
                   timeout: float = 120) -> dict[str, Any]:
        return self.wait_event(lambda e: e.get("event") == "stage" and e.get("stage") == stage
                               and e.get("state") == state, timeout,
                               f"stage {stage} {state}")

    def wait_copying(self, stage: str = "FILE COPY", data: int = 1,
                     timeout: float = 120) -> dict[str, Any]:
        """A progress event of ``stage`` with at least ``data`` bytes written."""
        return self.wait_event(lambda e: e.get("event") == "progress"
                               and e.get("stage") == stage and e.get("data", 0) >= data,
                               timeout, f"progress of {stage} past {data} bytes")

    def restarts(self, phase: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == "restart"
                    and (phase is None or e.get("phase") == phase)]

    def finish(self, timeout: float) -> int:
        """Wait for the pull's end (its output read whole); its exit status."""
        code = self.popen.wait(timeout)
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        for t in self._readers:
            t.join(10)
        return code

    def ended_within(self, timeout: float) -> float:
        """Wait for the end; the monotonic time it was seen to end (polled finely)."""
        def gone() -> bool:
            return self.popen.poll() is not None
        wait_until(gone, timeout, f"{self.name} to end", every=0.05)
        self.ended_at = time.monotonic()
        self.finish(10)
        return self.ended_at

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self.stderr_lines)

    @property
    def summary(self) -> dict[str, Any] | None:
        """The last line's object (the summary, or ``{error_no, error_message}``)."""
        with self._cond:
            return self.events[-1] if self.events else None


class NetFaults:
    """Two namespaces over a veth pair (see the module's docstring)."""

    def __init__(self, rate: str | None = "200mbit", port: int = DONOR_PORT) -> None:
        with _counter_lock:
            n = next(_counter)
        pid = os.getpid()
        self.n = n
        self.donor_ns = f"caf{pid}-{n}d"
        self.recipient_ns = f"caf{pid}-{n}r"
        self.veth_d, self.veth_r = "vcad", "vcar"  # names inside the namespaces only
        self.net = n % 250 + 1
        self.donor_ip = f"10.199.{self.net}.1"
        self.recipient_ip = f"10.199.{self.net}.2"
        self.rate = rate
        self.port = port
        self._made: list[str] = []
        self._procs: list[Proc] = []
        self._link_down = False

    @property
    def donor_address(self) -> str:
        return f"{self.donor_ip}:{self.port}"

    # -- setup and teardown -----------------------------------------------------------
    def __enter__(self) -> NetFaults:
        why = why_unavailable()
        if why:
            raise Unavailable(why)
        for ns in (self.donor_ns, self.recipient_ns):
            res = _run("ip", "netns", "add", ns)
            if res.returncode != 0:
                self._teardown_namespaces()
                raise Unavailable(f"ip netns add failed: {res.stderr.strip()}")
            self._made.append(ns)
        try:
            _check("ip", "-n", self.donor_ns, "link", "add", self.veth_d, "type", "veth",
                   "peer", "name", self.veth_r, "netns", self.recipient_ns)
            for ns, dev, ip in ((self.donor_ns, self.veth_d, self.donor_ip),
                                (self.recipient_ns, self.veth_r, self.recipient_ip)):
                _check("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _check("ip", "-n", ns, "link", "set", "lo", "up")
                _check("ip", "-n", ns, "link", "set", dev, "up")
                if self.rate:
                    _check("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                           "rate", self.rate, "burst", "256kb", "latency", "50ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            if proc.alive():
                proc.end()
        self._teardown_namespaces()

    def _teardown_namespaces(self) -> None:
        # Processes still inside a namespace (started by someone else's command in it,
        # e.g. an orphaned worker) keep it alive: kill them first, then delete it.
        for ns in self._made:
            res = _run("ip", "netns", "pids", ns)
            for word in res.stdout.split():
                try:
                    os.kill(int(word), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        for ns in reversed(self._made):
            _run("ip", "netns", "del", ns)  # the veth pair goes with its namespace
        self._made.clear()

    # -- processes ----------------------------------------------------------------------
    def popen(self, ns: str, cmd: list[str], **kw: Any) -> subprocess.Popen[str]:
        """``cmd`` in namespace ``ns`` (``ip netns exec`` execs it: the pid is the
        command's), in a new session, from the project's root; ended on exit."""
        p = self._popen(ns, cmd, **kw)
        self._procs.append(Proc(p, " ".join(cmd[:3])))
        return p

    @staticmethod
    def _popen(ns: str, cmd: list[str], **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("cwd", ROOT)
        kw.setdefault("text", True)
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], start_new_session=True,
                                **kw)

    def run(self, ns: str, cmd: list[str], timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        p = self.popen(ns, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def serve(self, datadir: Path | str, *extra: str, timeout: float = 60) -> Server:
        """``clone-agent serve DATADIR --bind DONOR_IP:PORT --allow-anonymous EXTRA`` in
        the donor namespace, once it printed ``ready HOST:PORT`` (bounded wait)."""
        p = self._popen(self.donor_ns, [*CLI, "serve", str(datadir), "--bind",
                                       self.donor_address, "--allow-anonymous", *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        server = Server(p, self.donor_address)
        self._procs.append(server)
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = ""
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = p.stdout.readline()
                    break
        finally:
            sel.close()
        server.start_readers()
        if line.strip() != f"ready {self.donor_address}":
            server.terminate()
            raise RuntimeError(f"donor not ready in {self.donor_ns}: {line!r} "
                               f"{server.stderr[-2000:]}")
        return server

    def pull(self, dest: Path | str, *extra: str, user: str = "anon",
             address: str | None = None, resume: bool = False) -> Pull:
        """``clone-agent pull USER@DONOR --data-dir DEST --json EXTRA`` (``resume``:
        ``--resume DEST``) in the recipient namespace."""
        where = ["--resume", str(dest)] if resume else ["--data-dir", str(dest)]
        p = self._popen(self.recipient_ns,
                        [*CLI, "pull", f"{user}@{address or self.donor_address}", *where,
                        "--json", *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pull = Pull(p, Path(dest))
        self._procs.append(pull)
        return pull

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A clone-agent command in the recipient namespace, run to its end."""
        return self.run(self.recipient_ns, [*CLI, *args], timeout=timeout)

    # -- faults -----------------------------------------------------------------------------
    def link_down(self) -> None:
        """The recipient's end of the veth down: no packet crosses, either way."""
        _check("ip", "-n", self.recipient_ns, "link", "set", self.veth_r, "down")
        self._link_down = True

    def link_up(self) -> None:
        _check("ip", "-n", self.recipient_ns, "link", "set", self.veth_r, "up")
        self._link_down = False
        # a veth end comes back with its carrier at once; the address stays
        wait_until(self._carrier, 10, "the link's carrier")

    def _carrier(self) -> bool:
        res = _run("ip", "-n", self.recipient_ns, "-o", "link", "show", self.veth_r)
        return "LOWER_UP" in res.stdout and ",UP" in res.stdout

    @contextmanager
    def outage(self, seconds: float) -> Iterator[float]:
        """The link down for ``seconds`` (the fault's own duration: the one fixed wait
        here); yields the monotonic time it went down."""
        began = time.monotonic()
        self.link_down()
        try:
            yield began
            left = began + seconds - time.monotonic()
            if left > 0:
                time.sleep(left)  # the outage itself
        finally:
            self.link_up()

    def reset(self, both: bool = True) -> int:
        """Reset every TCP connection to the donor's port (``ss -K``) in the recipient's
        namespace, and (``both``) from it in the donor's; how many sockets were killed
        (ss lists each one it killed)."""
        killed = 0
        cmds = [(self.recipient_ns, ["dst", self.donor_ip, "dport", "=", str(self.port)])]
        if both:
            cmds.append((self.donor_ns, ["src", self.donor_ip, "sport", "=", str(self.port)]))
        for ns, filt in cmds:
            res = _run("ip", "netns", "exec", ns, "ss", "-K", "-t", "-n", "-H", *filt)
            if res.returncode != 0:
                raise RuntimeError(f"ss -K failed in {ns}: {res.stderr.strip()}")
            killed += sum(1 for line in res.stdout.splitlines() if line.strip())
        return killed

    def connections(self, ns: str | None = None) -> int:
        """Established TCP connections to (recipient side) the donor's port."""
        ns = ns or self.recipient_ns
        res = _run("ip", "netns", "exec", ns, "ss", "-t", "-n", "-H", "state", "established",
                   "dst" if ns == self.recipient_ns else "src", self.donor_ip,
                   "dport" if ns == self.recipient_ns else "sport", "=", str(self.port))
        return sum(1 for line in res.stdout.splitlines() if line.strip())

    def set_rate(self, rate: str) -> None:
        """Change the tbf rate on both ends (a harness made with a rate)."""
        assert self.rate, "the harness was made without a rate limit"
        for ns, dev in ((self.donor_ns, self.veth_d), (self.recipient_ns, self.veth_r)):
            _check("tc", "-n", ns, "qdisc", "change", "dev", dev, "root", "tbf",
                   "rate", rate, "burst", "256kb", "latency", "50ms")

    def qdisc(self, ns: str | None = None) -> str:
        ns = ns or self.recipient_ns
        dev = self.veth_r if ns == self.recipient_ns else self.veth_d
        return _run("tc", "-n", ns, "qdisc", "show", "dev", dev).stdout

    def ping(self) -> bool:
        """One ping from the recipient to the donor answered within 2 s."""
        return _run("ip", "netns", "exec", self.recipient_ns, "ping", "-c", "1", "-W", "2",
                    self.donor_ip).returncode == 0


def local_pull(address: str, dest: Path | str, *extra: str, user: str = "anon") -> Pull:
    """``clone-agent pull USER@ADDRESS --data-dir DEST --json EXTRA`` in this namespace
    (a loopback donor), in a process group of its own; the caller ends it
    (``kill_all``) if the test fails before it does."""
    p = subprocess.Popen([*CLI, "pull", f"{user}@{address}", "--data-dir", str(dest),
                          "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, start_new_session=True)
    return Pull(p, Path(dest))


@contextmanager
def net_faults(rate: str | None = "200mbit") -> Iterator[NetFaults]:
    """``NetFaults`` for a test: skipped (with the reason) where it cannot be made."""
    try:
        net = NetFaults(rate).__enter__()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield net
    finally:
        net.__exit__()


@pytest.fixture
def netfaults() -> Iterator[NetFaults]:
    """Two namespaces over a 200 Mbit/s veth link, removed after the test."""
    with net_faults() as net:
        yield net
