"""The command line (CLI.md): one thin function per command, one exit point.

Signals are handled here only (STYLE.md 8): the first Ctrl-C or SIGTERM asks the
running clone or server to stop at a safe point and says so; the second aborts.
Every expected failure is a CloneError, printed as ``ERROR N (SQLSTATE): message``
plus ``hint: ...``, and mapped to an exit status by :func:`engine.errors.exit_status`.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_INTERRUPTED = "ERROR 1317 (70100): Query execution was interrupted\n"
_interrupted_early = False


def _interrupted_at_start(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while the command line is still importing (a tenth of a second): noted,
    and answered by main() in MySQL's words. Nothing is raised inside an import, where
    a half-initialised extension module could take the interpreter down with it."""
    global _interrupted_early
    _interrupted_early = True


signal.signal(signal.SIGINT, _interrupted_at_start)

import logging  # after the handler above, on purpose
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, Optional

import orjson
import typer

from engine.config import load_config
from engine.errors import CloneError, UsageError, exit_status

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Clone a live data directory between hosts, MySQL clone style.")

log = logging.getLogger("clone_agent")


def _state_dir() -> str:
    return os.environ.get("CLONE_AGENT_STATE_DIR") or os.path.join(
        os.path.expanduser("~"), ".local", "state", "clone-agent")


def _fail(err: CloneError, json_mode: bool = False) -> NoReturn:
    for one in err.each():  # a preflight reports several problems, each with its hint
        sys.stderr.write(one.line() + "\n")
        if one.hint:
            sys.stderr.write(f"hint: {one.hint}\n")
    sys.stderr.flush()
    if json_mode:
        sys.stdout.write(orjson.dumps(err.to_dict()).decode() + "\n")
        sys.stdout.flush()
    raise typer.Exit(exit_status(err))


@contextmanager
def _errors(json_mode: bool = False) -> Iterator[None]:
    """The one exit point for expected failures."""
    try:
        yield
    except CloneError as err:
        _fail(err, json_mode)


class StopFlag:
    """First SIGINT/SIGTERM: stop at a safe point; second: abort at once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.requested = False
        self._old: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write(f"clone-agent: stopping {self.what} at a safe point "
                         "(again to abort)\n")
        sys.stderr.flush()

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="clone-agent: %(message)s", stream=sys.stderr)


# -- the page store: init, workload, verify -------------------------------------------------
@app.command()
def init(
    datadir: Path = typer.Argument(..., help="the new data directory (must not exist)"),
    size: str = typer.Option("256MiB", "--size", help="approximate total size"),
    page_size: int = typer.Option(16384, "--page-size"),
    tables: int = typer.Option(4, "--tables", min=1, max=1000),
    accounts: int = typer.Option(10000, "--accounts", min=2),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Create a new emulated InnoDB-style data directory."""
    from engine.config import parse_size
    from engine.pagestore import init_datadir

    with _errors():
        try:
            nbytes = parse_size(size)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        control = init_datadir(str(datadir), nbytes, page_size, tables, accounts, seed)
        sys.stdout.write(f"initialized {datadir}: page size {control['page_size']}, "
                         f"{len(control['spaces'])} tablespaces, {accounts} accounts, "
                         f"server uuid {control['server_uuid']}\n")


@app.command()
def workload(
    datadir: Path = typer.Argument(...),
    rate: int = typer.Option(0, "--rate", min=0, help="transactions per second (0: max)"),
    duration: Optional[float] = typer.Option(None, "--duration", help="seconds"),
    seed: int = typer.Option(0, "--seed"),
    ddl_timeout: int = typer.Option(300, "--ddl-timeout"),
) -> None:
    """Run live writes (bank transfers through the redo log) until stopped."""
    _logging(False)
    from engine.pagestore import PageStore, Workload

    with _errors():
        with PageStore(str(datadir)) as store, StopFlag("the workload") as stop:
            first = store.last_txn + 1
            load = Workload(store, rate=rate, seed=seed, ddl_timeout=float(ddl_timeout))
            load.run(stop, duration)
        sys.stdout.write(f"workload: transactions {first}..{store.last_txn} "
                         f"({load.stats.txns} at {load.stats.tps():.0f}/s)\n")


@app.command()
def verify(
    datadir: Path = typer.Argument(...),
    json_mode: bool = typer.Option(False, "--json"),
) -> None:
    """Check every page and the bank invariant, offline. Exit 0 when ok."""
    from engine.pagestore import verify as do_verify

    with _errors(json_mode):
        result = do_verify(str(datadir))
    if json_mode:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        for key in ("ok", "pages", "bad_pages", "accounts", "balance_total", "max_txn",
                    "gtid_executed"):
            sys.stdout.write(f"{key:>14}: {result[key]}\n")
        for problem in result["problems"]:
            sys.stdout.write(f"  problem: {problem}\n")
    if not result["ok"]:
        raise typer.Exit(1)


# -- serve ------------------------------------------------------------------------------
@app.command()
def serve(
    datadir: Path = typer.Argument(..., help="the data directory to serve"),
    bind: str = typer.Option(..., "--bind", help="HOST:PORT to listen on"),
    workload: Optional[int] = typer.Option(None, "--workload",
                                           help="also run the live workload at TPS"),
    users: Optional[Path] = typer.Option(None, "--users", help="users file (later issue)"),
    metrics_addr: Optional[str] = typer.Option(None, "--metrics-addr", help="HOST:PORT"),
    readers: int = typer.Option(2, "--readers", min=1, max=64,
                                help="reader processes (ours, not MySQL's)"),
    ddl_every: float = typer.Option(3.0, "--ddl-every", help="seconds between the workload's "
                                    "DDL (0: none)"),
    debug_sync: Optional[str] = typer.Option(
        None, "--debug-sync", hidden=True,
        help="POINT=N,...: pause at clone_file_copy / clone_page_copy / clone_redo_copy "
             "until the workload commits N more transactions (tests)"),
    fault: Optional[str] = typer.Option(None, "--fault", hidden=True,
                                        help="tear_pages_of=REL (tests: torn page reads), "
                                        "die_at_reopen=1 (tests: RESTART fails)"),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", hidden=True,
                                       help="drop a clone whose recipient is silent this long"),
    report_tps: bool = typer.Option(False, "--report-tps", hidden=True,
                                    help="print 'tps LAST_TXN CLONING' on stdout each second"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The donor agent: serve DATADIR until SIGINT/SIGTERM."""
    _logging(verbose)
    from donor.server import DonorServer
    from engine.transport import parse_hostport

    with _errors():
        host, port = parse_hostport(bind)
        if workload is not None and workload < 0:
            raise UsageError("--workload takes transactions per second, 0 for full speed")
        log.warning("authentication is not implemented yet: any user name is accepted")
        server = DonorServer(str(datadir), host, port, readers=readers, workload=workload,
                             idle_timeout=idle_timeout,
                             debug_sync=_pairs(debug_sync, int), ddl_every=ddl_every,
                             faults=_pairs(fault, str),
                             report=_print_line if report_tps else None)

        def ready(h: str, p: int) -> None:
            sys.stdout.write(f"ready {h}:{p}\n")
            sys.stdout.flush()

        with StopFlag("the donor") as stop:
            server.serve(should_stop=stop, on_ready=ready)
        log.info("donor stopped")


def _print_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _pairs(text: str | None, kind: Callable[[str], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if item:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"'{item}' is not NAME=VALUE")
            out[key.strip()] = kind(value.strip())
    return out


# -- pull -------------------------------------------------------------------------------
def _parse_source(source: str) -> tuple[str, str, int]:
    from engine.transport import parse_hostport

    user, at, hostport = source.rpartition("@")
    if not at or not user:
        raise UsageError(f"'{source}' is not USER@HOST:PORT", hint="e.g. clone@10.0.0.5:3310")
    host, port = parse_hostport(hostport)
    return user, host, port


def _password(password_stdin: bool) -> str | None:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return os.environ.get("CLONE_AGENT_PASSWORD")


def _run_pull(make: Callable[[Any, Callable[[], bool]], Any], json_mode: bool,
              what: str) -> None:
    from clone_agent.progress import Reporter

    reporter = Reporter(json_mode)
    try:
        with _errors(json_mode), StopFlag(what) as stop:
            try:
                summary = make(reporter, stop)
            except KeyboardInterrupt:
                from engine.errors import QueryInterrupted
                raise QueryInterrupted() from None
    finally:
        reporter.close()
    if json_mode:
        sys.stdout.write(orjson.dumps({"event": "summary", **summary}).decode() + "\n")
    else:
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    from clone_agent.progress import human

    st = summary["clone_status"]
    sys.stderr.write(f"clone {st['state']}: {st['source']} -> {st['destination']}\n")
    for row in summary["clone_progress"]:
        if row["state"] != "Not Started":
            sys.stderr.write(f"  {row['stage']:<10} {row['state']:<11} {human(row['data']):>12}"
                             f"  {human(row['data_speed'])}/s\n")
    if "replace" in summary:
        sys.stderr.write(summary["replace"]["message"] + "\n")


@app.command()
def pull(
    source: str = typer.Argument(..., help="USER@HOST:PORT of the donor"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir",
                                           help="clone into this new absolute path"),
    replace: Optional[str] = typer.Option(None, "--replace",
                                          help="replace this existing data directory in "
                                          "place; the old data stays until the clone is whole"),
    keep_old: Optional[str] = typer.Option(None, "--keep-old", help="with --replace: move "
                                           "the old data to this new absolute path (same "
                                           "file system) instead of removing it"),
    password_stdin: bool = typer.Option(False, "--password-stdin"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file of clone_*"),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency"),
    autotune_concurrency: Optional[bool] = typer.Option(
        None, "--autotune-concurrency/--no-autotune-concurrency"),
    max_data_bandwidth: Optional[int] = typer.Option(None, "--max-data-bandwidth"),
    max_network_bandwidth: Optional[int] = typer.Option(None, "--max-network-bandwidth"),
    enable_compression: Optional[bool] = typer.Option(
        None, "--enable-compression/--no-enable-compression"),
    buffer_size: Optional[str] = typer.Option(None, "--buffer-size"),
    ddl_timeout: Optional[int] = typer.Option(None, "--ddl-timeout"),
    donor_timeout_after_network_failure: Optional[int] = typer.Option(
        None, "--donor-timeout-after-network-failure"),
    valid_donor_list: Optional[str] = typer.Option(None, "--valid-donor-list"),
    require_ssl: Optional[bool] = typer.Option(None, "--require-ssl/--require-no-ssl"),
    ssl_ca: Optional[str] = typer.Option(None, "--ssl-ca"),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout",
                                          help="seconds to reach the donor (ours)"),
    writers: int = typer.Option(2, "--writers", min=1, max=32, hidden=True,
                                help="writer processes (ours, not MySQL's)"),
    json_mode: bool = typer.Option(False, "--json", help="NDJSON events on stdout"),
    fault: Optional[str] = typer.Option(None, "--fault", hidden=True,
                                        help="kill_at=POINT: SIGKILL itself there (tests)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The recipient: clone the donor's data directory."""
    _logging(verbose)
    flags = dict(max_concurrency=max_concurrency, autotune_concurrency=autotune_concurrency,
                 max_data_bandwidth=max_data_bandwidth,
                 max_network_bandwidth=max_network_bandwidth,
                 enable_compression=enable_compression, buffer_size=buffer_size,
                 ddl_timeout=ddl_timeout,
                 donor_timeout_after_network_failure=donor_timeout_after_network_failure,
                 valid_donor_list=valid_donor_list, ssl_ca=ssl_ca)
    with _errors(json_mode):
        config = load_config(flags, os.environ, config_file)
        user, host, port = _parse_source(source)
        if (data_dir is None) == (replace is None):
            raise UsageError("give exactly one of --data-dir DIR and --replace DATADIR")
        if keep_old is not None and replace is None:
            raise UsageError("--keep-old goes with --replace DATADIR")
        faults = _pairs(fault, str)
        if require_ssl:
            raise UsageError("REQUIRE SSL: this build has no TLS transport yet",
                             hint="use --require-no-ssl, or a trusted network")
        password = _password(password_stdin)
        destination = replace if replace is not None else data_dir
        assert destination is not None

    from recipient.client import PullOptions
    from recipient.client import pull as do_pull

    def make(reporter: Any, stop: Callable[[], bool]) -> Any:
        return do_pull(PullOptions(user=user, host=host, port=port, destination=destination,
                                   config=config, password=password, state_dir=_state_dir(),
                                   connect_timeout=connect_timeout, should_stop=stop,
                                   emit=reporter, writers=writers,
                                   replace=replace is not None, keep_old=keep_old,
                                   faults=faults))

    _run_pull(make, json_mode, "the clone")


@app.command("clone-local")
def clone_local(
    datadir: Path = typer.Argument(..., help="the data directory to copy"),
    data_dir: str = typer.Option(..., "--data-dir", help="the new absolute path"),
    json_mode: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """CLONE LOCAL DATA DIRECTORY: the same snapshot, without a network."""
    _logging(verbose)
    from donor.local import LocalDonor
    from recipient.client import PullOptions, check_destination
    from recipient.client import pull as do_pull

    with _errors(json_mode):
        if not datadir.is_dir():
            raise UsageError(f"'{datadir}' is not a directory")
        dest = check_destination(data_dir)
        src = os.path.realpath(datadir)
        if os.path.realpath(os.path.dirname(dest)).startswith(src + os.sep) or \
                os.path.realpath(os.path.dirname(dest)) == src:
            from engine.errors import PathInDatadir
            raise PathInDatadir(src)
        config = load_config({}, os.environ, None)

    def make(reporter: Any, stop: Callable[[], bool]) -> Any:
        with LocalDonor(str(datadir)) as donor:
            return do_pull(PullOptions(user="local", host="localhost", port=0,
                                       destination=dest, config=config,
                                       state_dir=_state_dir(), url=donor.url,
                                       should_stop=stop, emit=reporter))

    _run_pull(make, json_mode, "the clone")


# -- status -----------------------------------------------------------------------------
def _status_view(dest: str) -> dict[str, Any]:
    from engine.ring import _alive
    from engine.status import FAILED, IN_PROGRESS, read_status
    from engine.swap import settle

    try:
        settle(dest, strict=False)  # a replace a crash interrupted: finished or undone first
    except (OSError, CloneError) as exc:  # the status is worth showing all the same
        log.warning("could not settle an interrupted replace of %s: %s", dest, exc)
    data = read_status(dest, _state_dir())
    st = data["clone_status"]
    if st.get("state") == IN_PROGRESS and st.get("pid") and not _alive(int(st["pid"])):
        st["state"] = FAILED  # the clone's process is gone: interrupted (1317 stays)
    return data


@app.command()
def status(
    dest: Path = typer.Argument(..., help="the clone's destination"),
    json_mode: bool = typer.Option(False, "--json"),
    watch: bool = typer.Option(False, "--watch", help="refresh every second until it ends"),
) -> None:
    """Show clone_status and clone_progress for the clone into DEST."""
    from clone_agent.progress import human

    with _errors(json_mode):
        while True:
            data = _status_view(str(dest))
            if json_mode:
                sys.stdout.write(orjson.dumps(data).decode() + "\n")
            else:
                st = data["clone_status"]
                for key in ("state", "source", "destination", "begin_time", "end_time",
                            "error_no", "error_message", "binlog_file", "binlog_position",
                            "gtid_executed"):
                    sys.stdout.write(f"{key:>16}: {st.get(key)}\n")
                sys.stdout.write(f"\n{'STAGE':<10} {'STATE':<11} {'THREADS':>7} "
                                 f"{'ESTIMATE':>12} {'DATA':>12} {'NETWORK':>12}\n")
                for row in data["clone_progress"]:
                    sys.stdout.write(f"{row['stage']:<10} {row['state']:<11} "
                                     f"{row['threads']:>7} {human(row['estimate']):>12} "
                                     f"{human(row['data']):>12} {human(row['network']):>12}\n")
            sys.stdout.flush()
            if not watch or data["clone_status"]["state"] != "In Progress":
                return
            time.sleep(1.0)  # --watch refreshes a display; it waits for no peer


# -- demo and bench ---------------------------------------------------------------------
@app.command()
def demo(
    size: str = typer.Option("384MiB", "--size", help="size of the sample data directory"),
    rate: int = typer.Option(0, "--rate", help="donor workload TPS (0: as fast as it can)"),
) -> None:
    """Init a data directory, serve it with a live workload, clone it, verify, clean up."""
    from bench.demo import run_demo
    from engine.config import parse_size

    with _errors():
        run_demo(parse_size(size), rate)


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick"),
    json_mode: bool = typer.Option(False, "--json"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for JSON and charts"),
    rounds: Optional[int] = typer.Option(None, "--rounds"),
    link: bool = typer.Option(False, "--link", help="only the rate-limited link benchmark "
                              "(two network namespaces; needs root)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="only the data shapes whose "
                                        "name contains this text (e.g. 'mixed')"),
    remove_each: bool = typer.Option(False, "--remove-each", help="remove each destination "
                                     "right after its run (the next tool then pays for "
                                     "the freed inodes; see docs/architecture.md)"),
) -> None:
    """clone-agent side by side with plain-tool baselines, on the same data, in one run."""
    from bench.link import run_link_bench
    from bench.suite import run_bench

    with _errors(json_mode):
        if link:
            report = run_link_bench(rounds=rounds or (2 if quick else 3))
            if out:
                os.makedirs(out, exist_ok=True)
                Path(out, "link.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            return
        run_bench(quick=quick, json_mode=json_mode, out=str(out) if out else None,
                  rounds=rounds, only=shape, remove_each=remove_each)


def main() -> None:
    from engine.stage import end_resource_tracker

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here: KeyboardInterrupt
    if _interrupted_early:
        sys.stderr.write(_INTERRUPTED)
        sys.exit(1)
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write(_INTERRUPTED)
        sys.exit(1)
    except SystemExit as exc:
        if exc.code == 130:  # typer's exit for a Ctrl-C it caught before a command ran
            sys.stderr.write(_INTERRUPTED)
            sys.exit(1)
        raise
    finally:
        end_resource_tracker()


if __name__ == "__main__":
    main()
