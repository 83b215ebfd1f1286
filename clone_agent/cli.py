"""The command line (docs/cli.md): one thin function per command, one exit point.

Signals are handled here only, never in a worker: the first Ctrl-C or SIGTERM asks the
running clone or server to stop at a safe point and says so; the second aborts.
Every expected failure is a CloneError, printed as ``ERROR N (SQLSTATE): message``
plus ``hint: ...``, and mapped to an exit status by :func:`engine.errors.exit_status`
(an interruption, 1317, exits 130 or 143 by the signal StopFlag saw). A usage error of
the parser is ERROR 8001 too, with a hint naming the command's ``--help``.
Anything else is a bug or a failure nobody foresaw: ``ERROR 8000 (HY000): <type>:
<message>``, exit 1, and its traceback only with ``-v`` (standard form: never the local
variables, which hold the password and the configuration). A single-valued option given
twice is a usage error (exit 2), never "the last one wins".

The password (``CLONE_AGENT_PASSWORD`` or ``--password-stdin``) never reaches argv, a log,
a status file or a child process: :func:`main` takes it out of the environment before
any command runs, so that no process started later inherits it.

This module is past 600 lines: one function per command, with what only the command
line may do (signals, the environment, the terminal). What renders lives
beside it (progress.py, statusview.py, systemd.py); splitting the commands by group
(clone, status, users) is left until the branches that add options here have merged,
as a move now would conflict with each of them.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_INTERRUPTED = "ERROR 1317 (70100): Query execution was interrupted\n"
_interrupted_early = False
#: The signal that last asked us to stop (StopFlag): 1317 exits 130 or 143 by it.
_signal_seen: int | None = None


def _interrupted_at_start(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C or SIGTERM while the command line is still importing: noted,
    and answered by main() in MySQL's words. Nothing is raised inside an import, where
    a half-initialised extension module could take the interpreter down with it."""
    global _interrupted_early, _signal_seen
    _interrupted_early = True
    _signal_seen = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT or SIGTERM before a command has a safe point to stop at (its StopFlag):
    unwound as Ctrl-C is, so that it ends in 1317 and not in a silent death."""
    global _signal_seen
    _signal_seen = signum
    raise KeyboardInterrupt


signal.signal(signal.SIGINT, _interrupted_at_start)
signal.signal(signal.SIGTERM, _interrupted_at_start)

import dataclasses
import logging  # after the handler above, on purpose
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any, NoReturn, Optional

import click
import orjson
import typer
from click.core import ParameterSource
from typer.core import TyperCommand

from engine.config import load_config
from engine.errors import (
    CloneError,
    Unexpected,
    UsageError,
    exit_status,
    interrupted_status,
)

# typer's pretty exceptions print every frame's local variables: the password, the
# whole configuration. Off; main() and _Command report what escapes a command.
app = typer.Typer(add_completion=True, no_args_is_help=True,  # --install-completion
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"],
                                    "max_content_width": 80},
                  # click's plain help, not rich's boxes: those cut long option names
                  # (--no-autotune-concurrency) to fit 80 columns
                  rich_markup_mode=None,
                  help="Clone a live data directory between hosts, MySQL clone style.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            sys.stdout.write(f"clone-agent {version('clone-agent')}\n")
        except PackageNotFoundError:  # run from a checkout that was never installed
            sys.stdout.write("clone-agent (not installed)\n")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", "-V", is_eager=True,
                                      callback=_version, help="print the version and exit"),
) -> None:
    """Clone a live data directory between hosts, MySQL clone style."""

log = logging.getLogger("clone_agent")


def _state_dir() -> str:
    """Where the recipient keeps its clone records: CLONE_AGENT_STATE_DIR, else the XDG
    base directory specification's state home ($XDG_STATE_HOME, default ~/.local/state)."""
    xdg = os.environ.get("XDG_STATE_HOME")
    if not xdg or not os.path.isabs(xdg):  # the specification: a relative one is ignored
        xdg = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.environ.get("CLONE_AGENT_STATE_DIR") or os.path.join(xdg, "clone-agent")


def _fail(err: CloneError, json_mode: bool = False) -> NoReturn:
    for one in err.each():  # a preflight reports several problems, each with its hint
        sys.stderr.write(one.line() + "\n")
        if one.hint:
            sys.stderr.write(f"hint: {one.hint}\n")
    sys.stderr.flush()
    if json_mode:
        sys.stdout.write(orjson.dumps(err.to_dict()).decode() + "\n")
        sys.stdout.flush()
    raise typer.Exit(exit_status(err, _signal_seen))


@contextmanager
def _errors(json_mode: bool = False) -> Iterator[None]:
    """The one exit point for expected failures."""
    try:
        yield
    except CloneError as err:
        _fail(err, json_mode)


def _unexpected(exc: BaseException, verbose: bool, json_mode: bool) -> NoReturn:
    """The catch-all: ERROR 8000 with the exception's type and message; the traceback
    (above it) only with -v. Python's standard form shows code, never local variables."""
    if verbose:
        import traceback

        sys.stderr.write("".join(traceback.format_exception(exc)))
    _fail(Unexpected.of(exc, hint="" if verbose else None), json_mode)


def _refuse_repeats(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """A single-valued option given twice is a usage error: click keeps the last value
    silently (``--data-dir A --data-dir B`` would clone into B). The parser lists each
    option once per occurrence; options that take many values (``multiple``, ``count``)
    and --help are exempt."""
    try:
        _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    except click.UsageError:
        return  # the real parse, right after, reports it
    helps = set(ctx.help_option_names)
    counts = Counter(p for p in order if isinstance(p, click.Option)
                     and not p.multiple and not p.count and not helps & set(p.opts))
    for opt, n in counts.items():
        if n > 1:
            raise click.UsageError(f"option '{_spelling(opt, args)}' given "
                                   f"{'twice' if n == 2 else f'{n} times'}", ctx)


def _spelling(opt: click.Option, args: list[str]) -> str:
    """The option as the user wrote it: ``--data-dir``, or ``-v/--verbose`` for both forms."""
    names = opt.opts + opt.secondary_opts
    used: list[str] = []
    for token in args:
        if token == "--":
            break
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name in names and name not in used:
            used.append(name)
    return "/".join(used or opt.opts[:1])


class _Command(TyperCommand):
    """Every command: repeated options refused; whatever escapes the command's body is
    reported in MySQL's form, with its -v and --json (its parameters ``verbose`` and
    ``json_mode``), not by typer."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeats(self, ctx, args)
        return super().parse_args(ctx, args)

    def format_arguments(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Nothing: typer's "Arguments" section lists them (click 8.5 would add its own
        "Positional arguments" with the same lines)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _argument_help(self)
        super().format_help(ctx, formatter)
        # typer escapes "[required]" for rich even when rich does not draw the help
        formatter.buffer[:] = [part.replace("\\[", "[") for part in formatter.buffer]

    def invoke(self, ctx: click.Context) -> Any:
        json_mode = bool(ctx.params.get("json_mode"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise  # typer.Exit is click's Exit; these are answers, not failures
        except CloneError as err:  # one raised outside a command's _errors()
            _fail(err, json_mode)
        except Exception as exc:
            _unexpected(exc, bool(ctx.params.get("verbose")), json_mode)


def _argument_help(command: click.Command) -> None:
    """Give arguments back their help: click 8.5's Parameter sets ``help`` to None after
    typer's TyperArgument has set it, so typer's Arguments section lost it."""
    import inspect

    if command.callback is None:
        return
    declared = inspect.signature(command.callback).parameters
    for param in command.params:
        info = declared.get(param.name or "")
        text = getattr(info.default, "help", None) if info is not None else None
        if isinstance(param, click.Argument) and getattr(param, "help", None) is None and text:
            param.help = text  # type: ignore[attr-defined]


def _command(name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return app.command(name, cls=_Command)


def _verbose_option() -> Any:
    return typer.Option(False, "--verbose", "-v",
                        help="debug logging, and the traceback of an unexpected error")


class StopFlag:
    """First SIGINT/SIGTERM: stop at a safe point; second: abort at once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.requested = False
        self._old: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        global _signal_seen
        _signal_seen = signum
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


_env_password: str | None = None
_env_password_taken = False


def _take_env_password() -> str | None:
    """CLONE_AGENT_PASSWORD, removed from this process's environment on the first call
    (from main(), before any command runs): workers are started with a copy of
    os.environ (engine/stage.py), and none of them may inherit the password."""
    global _env_password, _env_password_taken
    if not _env_password_taken:
        _env_password = os.environ.pop("CLONE_AGENT_PASSWORD", None)
        _env_password_taken = True
    return _env_password


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="clone-agent: %(message)s", stream=sys.stderr)


# -- the page store: init, workload, verify -------------------------------------------------
@_command()
def init(
    datadir: Path = typer.Argument(..., help="the new data directory (must not exist)"),
    size: str = typer.Option("256MiB", "--size", help="approximate total size, bytes or "
                             "a suffix (64MiB, 2GiB)"),
    page_size: int = typer.Option(16384, "--page-size", help="bytes per page "
                                  "(innodb_page_size)"),
    tables: int = typer.Option(4, "--tables", min=1, max=1000, help="user tablespaces"),
    accounts: int = typer.Option(10000, "--accounts", min=2, help="rows of bank/accounts"),
    seed: int = typer.Option(0, "--seed", help="the same seed, the same data"),
    verbose: bool = _verbose_option(),
) -> None:
    """Create a new emulated InnoDB-style data directory."""
    if verbose:
        _logging(verbose)
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


@_command()
def workload(
    datadir: Path = typer.Argument(..., help="the data directory to write to"),
    rate: int = typer.Option(0, "--rate", min=0, help="transactions per second (0: max)"),
    duration: Optional[float] = typer.Option(None, "--duration",
                                             help="seconds (default: until stopped)"),
    seed: int = typer.Option(0, "--seed", help="the same seed, the same transactions"),
    ddl_timeout: int = typer.Option(300, "--ddl-timeout", help="seconds a DDL waits for a "
                                    "clone's backup lock (clone_ddl_timeout)"),
    verbose: bool = _verbose_option(),
) -> None:
    """Run live writes (bank transfers through the redo log) until stopped."""
    _logging(verbose)
    from engine.pagestore import PageStore, Workload

    with _errors():
        with PageStore(str(datadir)) as store, StopFlag("the workload") as stop:
            first = store.last_txn + 1
            load = Workload(store, rate=rate, seed=seed, ddl_timeout=float(ddl_timeout))
            load.run(stop, duration)
        sys.stdout.write(f"workload: transactions {first}..{store.last_txn} "
                         f"({load.stats.txns} at {load.stats.tps():.0f}/s)\n")


@_command()
def verify(
    datadir: Path = typer.Argument(..., help="the data directory to check"),
    json_mode: bool = typer.Option(False, "--json", help="one JSON object on stdout"),
    verbose: bool = _verbose_option(),
) -> None:
    """Check every page and the bank invariant, offline. Exit 0 when ok."""
    if verbose:
        _logging(verbose)
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
@_command()
def serve(
    datadir: Path = typer.Argument(..., help="the data directory to serve"),
    bind: Optional[str] = typer.Option(None, "--bind", help="HOST:PORT to listen on "
                                       "(required, here or in --config's [serve])"),
    config_file: Optional[Path] = typer.Option(
        None, "--config", help="a TOML file whose [serve] table sets these options (a flag "
        "wins); default: $CLONE_AGENT_CONFIG or $XDG_CONFIG_HOME/clone-agent/config.toml"),
    workload: Optional[int] = typer.Option(None, "--workload",
                                           help="also run the live workload at TPS "
                                           "transactions per second (0: max)"),
    readers: int = typer.Option(2, "--readers", min=1, max=64,
                                help="reader processes (ours, not MySQL's)"),
    ddl_every: float = typer.Option(3.0, "--ddl-every", help="seconds between the workload's "
                                    "DDL (default 3; 0: none)"),
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
    users: Optional[Path] = typer.Option(
        None, "--users", help="the users who may clone (`clone-agent user add`)"),
    key: Optional[Path] = typer.Option(
        None, "--key", help="the donor's private key (`clone-agent keygen`); default: a new "
        "key for this run, its fingerprint logged"),
    require_secure_transport: bool = typer.Option(
        False, "--require-secure-transport", help="refuse recipients that ask for a plain "
        "connection (--require-no-ssl)"),
    allow_anonymous: bool = typer.Option(
        False, "--allow-anonymous", help="let anyone who reaches the port clone, without a "
        "user (only on a trusted network)"),
    metrics_addr: Optional[str] = typer.Option(
        None, "--metrics-addr", help="HOST:PORT: serve Prometheus metrics at "
        "http://HOST:PORT/metrics (default: none)"),
    verbose: bool = _verbose_option(),
) -> None:
    """The donor agent: serve DATADIR until SIGINT/SIGTERM."""
    from clone_agent.systemd import Notifier, service_logging

    service_logging(verbose)
    from donor.server import DonorServer
    from engine.auth import UsersFile
    from engine.crypto import load_private
    from engine.transport import parse_hostport

    with _errors():
        (bind, users, key, require_secure_transport, allow_anonymous, workload, readers,
         ddl_every, metrics_addr) = _serve_settings(config_file, dict(
             bind=bind, users=users, key=key,
             require_secure_transport=require_secure_transport,
             allow_anonymous=allow_anonymous, workload=workload, readers=readers,
             ddl_every=ddl_every, metrics_addr=metrics_addr)).values()
        if bind is None:
            raise UsageError("serve needs --bind HOST:PORT",
                             hint="give it, or set bind under [serve] in --config")
        host, port = parse_hostport(bind)
        if workload is not None and workload < 0:
            raise UsageError("--workload takes transactions per second, 0 for full speed")
        if users is None and not allow_anonymous:
            raise UsageError("serve needs --users FILE (who may clone)",
                             hint="make one with `clone-agent user add NAME --users FILE`, "
                             "or give --allow-anonymous on a trusted network")
        if users is not None and allow_anonymous:
            raise UsageError("--users and --allow-anonymous exclude each other")
        if allow_anonymous:
            log.warning("--allow-anonymous: anyone who reaches %s may clone %s", bind,
                        datadir)
        server = DonorServer(str(datadir), host, port, readers=readers, workload=workload,
                             idle_timeout=idle_timeout,
                             debug_sync=_pairs(debug_sync, int), ddl_every=ddl_every,
                             faults=_pairs(fault, str),
                             report=_print_line if report_tps else None,
                             users=UsersFile.load(str(users)) if users is not None else None,
                             key=load_private(str(key)) if key is not None else None,
                             require_secure_transport=require_secure_transport)

        notifier = Notifier()

        def ready(h: str, p: int) -> None:
            sys.stdout.write(f"ready {h}:{p}\n")
            sys.stdout.flush()
            notifier.notify("READY=1", f"STATUS=serving {datadir} on {h}:{p}",
                            f"MAINPID={os.getpid()}")

        def stopping() -> bool:
            if stop():
                notifier.stopping()  # systemd hears it at the first signal
                return True
            return False

        try:
            with _metrics(metrics_addr, server.stats, "donor"), \
                    StopFlag("the donor") as stop:
                server.serve(should_stop=stopping, on_ready=ready)
        finally:
            notifier.stopping()  # also when serve failed: systemd stops waiting
            notifier.close()
        log.info("donor stopped")


def _serve_settings(config_file: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    """serve's options: each from the command line when given there, else from the
    ``[serve]`` table of the configuration file (``--config``, else the default one),
    else its default. The same keys, in the same order, as ``options``."""
    path = config_file or _default_config()
    if path is None:
        return options
    from engine.config import load_serve_config

    ctx = click.get_current_context()
    merged = dict(options)
    for name, value in load_serve_config(path).items():
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            merged[name] = Path(value) if name in ("users", "key") else value
    return merged


@contextmanager
def _metrics(addr: str | None, stats: Any, role: str) -> Iterator[None]:
    """Prometheus metrics at http://ADDR/metrics while the block runs (--metrics-addr)."""
    if addr is None:
        yield
        return
    from engine.metrics import serve_metrics
    from engine.transport import parse_hostport

    host, port = parse_hostport(addr)
    try:
        served = serve_metrics(host, port, stats, role)
        port_of = served.__enter__()
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {addr}: {exc.strerror or exc}",
                         hint="choose a free --metrics-addr") from None
    log.info("metrics at http://%s:%d/metrics", host, port_of())
    try:
        yield
    finally:
        served.__exit__(None, None, None)


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


def _default_config() -> Path | None:
    """The configuration file when --config is not given: ``$CLONE_AGENT_CONFIG``, else
    ``$XDG_CONFIG_HOME/clone-agent/config.toml`` (``~/.config/...``) if it exists. A
    ``CLONE_AGENT_CONFIG`` that names no file is an error, not a silent default."""
    named = os.environ.get("CLONE_AGENT_CONFIG")
    if named:
        return Path(named)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".config")
    path = Path(base) / "clone-agent" / "config.toml"
    return path if path.is_file() else None


def _warn_config(err: CloneError) -> None:
    """A CLONE_AGENT_* variable that names no setting: said, and the command goes on."""
    text = err.args_[0] if err.args_ else err.message  # the problem, without the prefix
    sys.stderr.write(f"warning: {text}" + (f" ({err.hint})" if err.hint else "") + "\n")


# -- pull -------------------------------------------------------------------------------
def _parse_source(source: str, anonymous: bool = False) -> tuple[str, str, int]:
    from engine.transport import parse_hostport

    user, at, hostport = source.rpartition("@")
    if not at or not (user or anonymous):
        raise UsageError(f"'{source}' is not USER@HOST:PORT", hint="e.g. clone@10.0.0.5:3310")
    host, port = parse_hostport(hostport)
    return user, host, port


def _password(password_stdin: bool) -> str | None:
    """One line of stdin with --password-stdin, else CLONE_AGENT_PASSWORD (already out
    of the environment), else a prompt on a terminal. Never an argument: argv is
    readable by every local user."""
    env_password = _take_env_password()
    password = sys.stdin.readline().rstrip("\n") if password_stdin else env_password
    if password is None and sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ") or None
    if password is not None:
        try:
            password.encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates
            raise UsageError("the password is not valid UTF-8",  # and never shown
                             hint="the password travels as UTF-8 text") from None
    return password


def _run_pull(make: Callable[[Any, Callable[[], bool]], Any], json_mode: bool,
              what: str, metrics_addr: str | None = None) -> None:
    from clone_agent.progress import Reporter
    from engine.metrics import RecipientStats

    reporter = Reporter(json_mode)
    stats = RecipientStats()

    def emit(event: dict[str, Any]) -> None:
        stats.observe(event)  # the metrics read the same events as the display
        reporter(event)

    try:
        with _errors(json_mode), _metrics(metrics_addr, stats, "recipient"), \
                StopFlag(what) as stop:
            ok = False
            try:
                summary = make(emit, stop)
                ok = True
            except KeyboardInterrupt:
                from engine.errors import QueryInterrupted
                raise QueryInterrupted() from None
            finally:
                stats.end(ok)
    finally:
        reporter.close()
    if json_mode:
        sys.stdout.write(orjson.dumps({"event": "summary", **summary}).decode() + "\n")
    else:
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    from clone_agent.progress import human, summary_line

    st = summary["clone_status"]
    sys.stderr.write(f"clone {st['state']}: {st['source']} -> {st['destination']}\n")
    if st.get("encrypted"):
        sys.stderr.write(f"  encrypted, donor key {st['donor_key']}\n")
    elif st.get("source", "").split(":")[0] not in ("localhost", ""):
        sys.stderr.write("  not encrypted\n")
    for row in summary["clone_progress"]:
        if row["state"] != "Not Started":
            sys.stderr.write(f"  {row['stage']:<10} {row['state']:<11} {human(row['data']):>12}"
                             f"  {human(row['data_speed'])}/s\n")
    if "replace" in summary:
        sys.stderr.write(summary["replace"]["message"] + "\n")
    sys.stderr.write(f"{summary_line(summary)}\n")
    if st.get("warning_count"):  # said last: what the copy does not hold
        sys.stderr.write(f"clone {st['state']} with {st['warning_count']} warnings (see "
                         f"above, or `clone-agent status {st['destination']} --json`)\n")


def _fidelity(numeric_ids: bool, no_xattrs: bool, no_acls: bool, fail_on_change: bool,
              skip_unreadable: bool) -> Any:
    from recipient.meta import Fidelity

    return Fidelity(numeric_ids=numeric_ids, xattrs=not no_xattrs, acls=not no_acls,
                    fail_on_change=fail_on_change, skip_unreadable=skip_unreadable)


_NUMERIC_IDS = typer.Option(False, "--numeric-ids",
                            help="keep owners' numbers, not their names (as rsync)")
_NO_XATTRS = typer.Option(False, "--no-xattrs", help="do not copy extended attributes")
_NO_ACLS = typer.Option(False, "--no-acls", help="do not copy POSIX ACLs")
_FAIL_ON_CHANGE = typer.Option(False, "--fail-on-change",
                               help="fail if a file changes while it is read")
_SKIP_UNREADABLE = typer.Option(False, "--skip-unreadable",
                                help="leave out (and report) what the donor cannot read")


@_command()
def pull(
    source: str = typer.Argument(..., help="USER@HOST:PORT of the donor"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir",
                                           help="clone into this new absolute path "
                                           "(must not exist)"),
    replace: Optional[str] = typer.Option(None, "--replace",
                                          help="replace this existing data directory in "
                                          "place; the old data stays until the clone is whole"),
    resume_dir: Optional[str] = typer.Option(None, "--resume", help="continue the clone "
                                             "into this directory whose pull died, while "
                                             "the donor still keeps it"),
    keep_old: Optional[str] = typer.Option(None, "--keep-old", help="with --replace: move "
                                           "the old data to this new absolute path (same "
                                           "file system) instead of removing it"),
    password_stdin: bool = typer.Option(False, "--password-stdin",
                                        help="read the password as one line of stdin "
                                        "(else CLONE_AGENT_PASSWORD)"),
    config_file: Optional[Path] = typer.Option(
        None, "--config", help="a TOML file of clone_* variables (below flags and "
        "CLONE_AGENT_* variables)"),
    max_concurrency: Optional[int] = typer.Option(
        None, "--max-concurrency", help="the most streams, 1 to 128 (default 16; "
        "clone_max_concurrency)"),
    autotune_concurrency: Optional[bool] = typer.Option(
        None, "--autotune-concurrency/--no-autotune-concurrency",
        help="start with one stream, add more while they pay (default on; "
        "clone_autotune_concurrency)"),
    max_data_bandwidth: Optional[str] = typer.Option(
        None, "--max-data-bandwidth", help="MiB/s written, or 100M, 1G (default 0: "
        "unlimited; clone_max_data_bandwidth)"),
    max_network_bandwidth: Optional[str] = typer.Option(
        None, "--max-network-bandwidth", help="MiB/s received, or 100M, 1G (default 0: "
        "unlimited; clone_max_network_bandwidth)"),
    enable_compression: Optional[bool] = typer.Option(
        None, "--enable-compression/--no-enable-compression",
        help="compress on the network (default off; clone_enable_compression)"),
    buffer_size: Optional[str] = typer.Option(
        None, "--buffer-size", help="bytes per block, or 1MiB..256MiB (default 4MiB; "
        "clone_buffer_size)"),
    ddl_timeout: Optional[int] = typer.Option(
        None, "--ddl-timeout", help="seconds to wait for the donor's backup lock "
        "(default 300; clone_ddl_timeout)"),
    valid_donor_list: Optional[str] = typer.Option(
        None, "--valid-donor-list", help="HOST:PORT,... the only donors allowed "
        "(default: any; clone_valid_donor_list)"),
    donor_timeout_after_network_failure: Optional[int] = typer.Option(
        None, "--donor-timeout-after-network-failure", help="minutes, 0 to 30, to "
        "reconnect and resume after a network failure, and the donor keeps the clone "
        "(default 5; 0: no restart; clone_donor_timeout_after_network_failure)"),
    require_ssl: Optional[bool] = typer.Option(
        None, "--require-ssl/--require-no-ssl",
        help="fail unless the clone is encrypted / ask for a plain one; default: "
        "encrypted when the donor offers it"),
    ssl_ca: Optional[Path] = typer.Option(
        None, "--ssl-ca", help="the donor's public key (its PREFIX.pub): the clone fails "
        "unless the donor holds it"),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout",
                                          help="seconds to reach the donor (ours, not "
                                          "MySQL's)"),
    writers: int = typer.Option(2, "--writers", min=1, max=32, hidden=True,
                                help="writer processes (ours, not MySQL's)"),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", hidden=True,
                                       help="fail when the donor sends no block this long"),
    json_mode: bool = typer.Option(False, "--json", help="NDJSON events on stdout, the "
                                   "last one the summary (default off)"),
    metrics_addr: Optional[str] = typer.Option(
        None, "--metrics-addr", help="HOST:PORT: serve Prometheus metrics at "
        "http://HOST:PORT/metrics while the clone runs (default: none)"),
    numeric_ids: bool = _NUMERIC_IDS,
    no_xattrs: bool = _NO_XATTRS,
    no_acls: bool = _NO_ACLS,
    fail_on_change: bool = _FAIL_ON_CHANGE,
    skip_unreadable: bool = _SKIP_UNREADABLE,
    fault: Optional[str] = typer.Option(None, "--fault", hidden=True,
                                        help="kill_at=POINT: SIGKILL itself there (tests)"),
    verbose: bool = _verbose_option(),
) -> None:
    """The recipient: clone the donor's data directory."""
    _logging(verbose)
    flags = dict(max_concurrency=max_concurrency, autotune_concurrency=autotune_concurrency,
                 max_data_bandwidth=max_data_bandwidth,
                 max_network_bandwidth=max_network_bandwidth,
                 enable_compression=enable_compression, buffer_size=buffer_size,
                 ddl_timeout=ddl_timeout, valid_donor_list=valid_donor_list,
                 donor_timeout_after_network_failure=donor_timeout_after_network_failure)
    with _errors(json_mode):
        password = _password(password_stdin)
        config = load_config(flags, os.environ, config_file or _default_config(),
                             warn=_warn_config)
        user, host, port = _parse_source(source)
        if sum(x is not None for x in (data_dir, replace, resume_dir)) != 1:
            raise UsageError("give exactly one of --data-dir DIR, --replace DATADIR and "
                             "--resume DIR")
        if keep_old is not None and replace is None:
            raise UsageError("--keep-old goes with --replace DATADIR")
        faults = _pairs(fault, str)
        destination = replace if replace is not None else resume_dir \
            if resume_dir is not None else data_dir
        assert destination is not None
        ssl = "prefer" if require_ssl is None else "require" if require_ssl else "none"
        pinned = None
        if ssl_ca is not None:
            from engine.crypto import load_public

            if ssl == "none":
                raise UsageError("--ssl-ca pins the key of an encrypted clone: it cannot go "
                                 "with --require-no-ssl")
            pinned = load_public(str(ssl_ca))

    from recipient.client import PullOptions
    from recipient.client import pull as do_pull

    def make(reporter: Any, stop: Callable[[], bool]) -> Any:
        return do_pull(PullOptions(user=user, host=host, port=port, destination=destination,
                                   config=config, password=password, state_dir=_state_dir(),
                                   connect_timeout=connect_timeout, should_stop=stop,
                                   emit=reporter, writers=writers, ssl=ssl, pinned=pinned,
                                   idle_timeout=idle_timeout,
                                   keep=_fidelity(numeric_ids, no_xattrs, no_acls,
                                                  fail_on_change, skip_unreadable),
                                   replace=replace is not None, keep_old=keep_old,
                                   faults=faults, resume=resume_dir is not None))

    _run_pull(make, json_mode, "the clone", metrics_addr)


@_command("clone-local")
def clone_local(
    datadir: Path = typer.Argument(..., help="the data directory to copy"),
    data_dir: str = typer.Option(..., "--data-dir", help="the new absolute path"),
    json_mode: bool = typer.Option(False, "--json", help="NDJSON events on stdout"),
    numeric_ids: bool = _NUMERIC_IDS,
    no_xattrs: bool = _NO_XATTRS,
    no_acls: bool = _NO_ACLS,
    fail_on_change: bool = _FAIL_ON_CHANGE,
    skip_unreadable: bool = _SKIP_UNREADABLE,
    verbose: bool = _verbose_option(),
) -> None:
    """CLONE LOCAL DATA DIRECTORY: the same snapshot, without a network."""
    _logging(verbose)
    from donor.local import LocalDonor, direct_copy
    from recipient.destination import check_new_directory

    with _errors(json_mode):
        if not datadir.is_dir():
            raise UsageError(f"'{datadir}' is not a directory")
        dest = check_new_directory(data_dir)
        src = os.path.realpath(datadir)
        if os.path.realpath(os.path.dirname(dest)).startswith(src + os.sep) or \
                os.path.realpath(os.path.dirname(dest)) == src:
            from engine.errors import PathInDatadir
            raise PathInDatadir(src)
        config = load_config({}, os.environ, _default_config(), warn=_warn_config)
        # The fast path (docs/copies.md): the donor's readers copy file data into the
        # destination with copy_file_range, and the recipient leaves it to them.
        direct = direct_copy(config)
        # The donor's thread starts before the recipient's modules are imported, so
        # that its start (its imports, its readers) overlaps theirs.
        donor = LocalDonor(str(datadir), copy_to=dest if direct else None).start()
    try:
        from recipient.client import PullOptions
        from recipient.client import pull as do_pull

        keep = _fidelity(numeric_ids, no_xattrs, no_acls, fail_on_change, skip_unreadable)

        def make(reporter: Any, stop: Callable[[], bool]) -> Any:
            with donor:  # waits until it serves; stops it however the clone ends
                return do_pull(PullOptions(user="local", host="localhost", port=0,
                                           destination=dest, config=config,
                                           state_dir=_state_dir(), url=donor.url,
                                           should_stop=stop, emit=reporter,
                                           ssl="none",  # a socket in a 0700 directory
                                           keep=dataclasses.replace(keep,
                                                                    direct_copy=direct)))

        _run_pull(make, json_mode, "the clone")
    finally:
        donor.close()


# -- status ---------------------------------------------------------------------------
def _status_view(dest: str) -> dict[str, Any]:
    from engine.ring import _alive
    from engine.status import present, read_status
    from engine.swap import settle

    try:
        settle(dest, strict=False)  # a replace a crash interrupted: finished or undone first
    except (OSError, CloneError) as exc:  # the status is worth showing all the same
        log.warning("could not settle an interrupted replace of %s: %s", dest, exc)
    data = read_status(dest, _state_dir())
    data["clone_status"] = present(data["clone_status"], _alive)
    _resumable(dest, data["clone_status"])
    return data


def _resumable(dest: str, st: dict[str, Any]) -> None:
    """An interrupted clone whose record is there: until when `pull --resume` may
    continue it (its last record + the restart window the donor keeps it for)."""
    from datetime import datetime

    from engine.status import FAILED
    from recipient import resume

    if st.get("state") != FAILED or st.get("error_no") != 1317:
        return
    try:
        record = resume.load(dest)
    except CloneError:
        return
    until = float(record["saved"]) + float(record.get("restart_timeout") or 0)
    st["resumable_until"] = datetime.fromtimestamp(until, UTC).isoformat(
        timespec="seconds")


@_command()
def kill(
    dest: Path = typer.Argument(..., help="the destination of the running clone"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds to wait for it to end"),
    verbose: bool = _verbose_option(),
) -> None:
    """Stop the clone running into DEST (MySQL's KILL QUERY): it stops at a safe point,
    tells the donor, removes DEST and ends with ERROR 1317."""
    _logging(verbose)
    from engine.errors import NoSuchClone
    from engine.status import IN_PROGRESS

    with _errors():
        path = os.path.abspath(str(dest))
        try:
            st = _status_view(path)["clone_status"]
        except CloneError:
            raise NoSuchClone(f"no clone runs into '{path}'") from None
        pid = int(st.get("pid") or 0)
        if st.get("state") != IN_PROGRESS or not pid or not _is_pull_of(pid, path):
            raise NoSuchClone(f"no clone runs into '{path}'")
        os.kill(pid, signal.SIGTERM)  # the pull's StopFlag: a safe point, EXIT, cleanup
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                raise NoSuchClone(
                    f"the clone into '{path}' (pid {pid}) did not stop within {timeout:g} s",
                    hint="kill it with SIGKILL; its destination then stays, "
                    "`pull --resume` or removal is yours")
            time.sleep(0.05)  # polling another process's end: no handle to wait on
    sys.stderr.write(f"clone into {path} stopped (pid {pid})\n")


def _pid_alive(pid: int) -> bool:
    from engine.ring import _alive

    if not _alive(pid):
        return False
    try:  # a zombie (a child its parent has not reaped yet) has ended too
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _is_pull_of(pid: int, path: str) -> bool:
    """Is ``pid`` a clone-agent pull (or clone-local) into ``path``? A status file's pid
    may since belong to another process: it is never signalled."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    if not any("clone_agent" in a or "clone-agent" in a for a in argv):
        return False
    names = [a.partition("=")[2] if a.startswith("--") else a for a in argv]
    return any(os.path.normpath(os.path.join(cwd, a)) == path for a in names if a)


@_command()
def status(
    dest: Optional[Path] = typer.Argument(
        None, help="the clone's destination; without it, the recent clones (the last 50)"),
    json_mode: bool = typer.Option(False, "--json", help="one JSON object (a list without "
                                   "DEST); with --watch, one per refresh"),
    watch: bool = typer.Option(False, "--watch", help="refresh every second until the clone "
                               "ends: in place on a terminal, one block after another "
                               "otherwise"),
    donor: Optional[str] = typer.Option(
        None, "--donor", help="[USER@]HOST:PORT: ask that donor for its running or last "
        "clone instead (authenticated as a pull)"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="with --donor: "
                                        "read the password as one line of stdin"),
    require_ssl: Optional[bool] = typer.Option(
        None, "--require-ssl/--require-no-ssl", help="with --donor: as pull's"),
    ssl_ca: Optional[Path] = typer.Option(None, "--ssl-ca", help="with --donor: the "
                                          "donor's public key, pinned"),
    verbose: bool = _verbose_option(),
) -> None:
    """Show clone_status and clone_progress for the clone into DEST, or list the recent
    clones, or (--donor) a donor's running or last clone. Exits 1 when the clone failed."""
    if verbose:
        _logging(verbose)
    from clone_agent.statusview import Redraw, render_list, render_one
    from engine.ring import _alive
    from engine.status import FAILED, IN_PROGRESS, list_history, present

    with _errors(json_mode):
        if donor is not None:
            if dest is not None:
                raise UsageError("give DEST or --donor, not both")
            _donor_status(donor, json_mode, watch, password_stdin, require_ssl, ssl_ca)
            return
        if dest is None:
            if watch:
                raise UsageError("--watch follows one clone: give its DEST")
            rows = [present(st, _alive) for st in list_history(_state_dir())]
            sys.stdout.write(orjson.dumps(rows).decode() + "\n" if json_mode
                             else render_list(rows))
            return
        screen = Redraw(sys.stdout, json_mode)
        while True:
            data = _status_view(str(dest))
            screen.show(orjson.dumps(data).decode() + "\n" if json_mode else render_one(data))
            state = data["clone_status"]["state"]
            if not watch or state != IN_PROGRESS:
                break
            time.sleep(1.0)  # --watch refreshes a display; it waits for no peer
    if state == FAILED:
        raise typer.Exit(1)  # a script can test the outcome without parsing


def _donor_status(donor: str, json_mode: bool, watch: bool, password_stdin: bool,
                  require_ssl: bool | None, ssl_ca: Path | None) -> None:
    """status --donor: STATUS to the donor, once or every second while it clones."""
    from clone_agent.statusview import Redraw, render_donor
    from recipient.donorstatus import donor_status
    from recipient.transfer import Security

    user, host, port = _parse_source(donor if "@" in donor else f"@{donor}", anonymous=True)
    ssl = "prefer" if require_ssl is None else "require" if require_ssl else "none"
    pinned = None
    if ssl_ca is not None:
        from engine.crypto import load_public

        pinned = load_public(str(ssl_ca))
    security = Security(user=user, password=_password(password_stdin), ssl=ssl,
                        pinned=pinned)
    screen = Redraw(sys.stdout, json_mode)
    while True:
        view = donor_status(host, port, security)
        screen.show(orjson.dumps(view).decode() + "\n" if json_mode
                    else render_donor(f"{host}:{port}", view))
        clone = view.get("clone") or {}
        if not watch or clone.get("state") != "In Progress":
            return
        time.sleep(1.0)  # --watch refreshes a display; it waits for no peer


# -- demo and bench ---------------------------------------------------------------------
@_command()
def demo(
    size: str = typer.Option("384MiB", "--size", help="size of the sample data directory"),
    rate: int = typer.Option(0, "--rate", help="donor workload TPS (0: as fast as it can)"),
    verbose: bool = _verbose_option(),
) -> None:
    """Init a data directory, serve it with a live workload, clone it, verify, clean up."""
    if verbose:
        _logging(verbose)
    from bench.demo import run_demo
    from engine.config import parse_size

    with _errors():
        run_demo(parse_size(size), rate)


@_command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="smaller data, fewer rounds"),
    json_mode: bool = typer.Option(False, "--json", help="the report as one JSON object"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for JSON and charts"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="interleaved rounds "
                                         "(default 3, 2 with --quick)"),
    link: bool = typer.Option(False, "--link", help="only the rate-limited link benchmark "
                              "(two network namespaces; needs root)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="only the data shapes whose "
                                        "name contains this text (e.g. 'mixed')"),
    remove_each: bool = typer.Option(False, "--remove-each", help="remove each destination "
                                     "right after its run (the next tool then pays for "
                                     "the freed inodes; see docs/architecture.md)"),
    tool: Optional[list[str]] = typer.Option(None, "--tool", help="only this tool beside "
                                             "clone-agent (repeatable), e.g. 'cp -a', "
                                             "'clone-agent local'; no timelines"),
    verbose: bool = _verbose_option(),
) -> None:
    """clone-agent side by side with plain-tool baselines, on the same data, in one run."""
    from bench.link import run_link_bench
    from bench.suite import run_bench

    if verbose:
        _logging(verbose)

    with _errors(json_mode):
        if link:
            report = run_link_bench(rounds=rounds or (2 if quick else 3))
            if out:
                os.makedirs(out, exist_ok=True)
                Path(out, "link.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            return
        run_bench(quick=quick, json_mode=json_mode, out=str(out) if out else None,
                  rounds=rounds, only=shape, remove_each=remove_each, tools_only=tool)


# -- keys and users ---------------------------------------------------------------------
@_command()
def keygen(
    out: str = typer.Option(..., "--out", help="PREFIX: writes PREFIX.key (secret, 0600) "
                            "and PREFIX.pub (give it to recipients for --ssl-ca)"),
    verbose: bool = _verbose_option(),
) -> None:
    """Make the donor's key pair; prints the public key's fingerprint."""
    _logging(verbose)
    from engine.crypto import write_keypair

    with _errors():
        key = write_keypair(out)
    sys.stdout.write(f"{key.fingerprint}\n")


user_app = typer.Typer(no_args_is_help=True, help="Manage the users who may clone "
                       "(a users file of SCRAM-SHA-256 verifiers, never passwords).")
app.add_typer(user_app, name="user")


def _new_password() -> str:
    """Asked twice on a terminal; else one line of stdin. Never an argument."""
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise UsageError("the two passwords differ")
        return first
    line = sys.stdin.readline()
    if not line:
        raise UsageError("no password on stdin", hint="give it as one line of stdin")
    return line.rstrip("\n")


@user_app.command("add", cls=_Command)
def user_add(
    name: str = typer.Argument(..., help="the user name"),
    users: Path = typer.Option(..., "--users", help="the users file (created when missing)"),
    no_backup_admin: bool = typer.Option(False, "--no-backup-admin",
                                         help="without the BACKUP_ADMIN privilege"),
    verbose: bool = _verbose_option(),
) -> None:
    """Add a user, or set a user's password and privilege."""
    _logging(verbose)
    from engine.auth import UsersFile, check_name, make_user

    with _errors():
        check_name(name)
        book = UsersFile.load(str(users), create=True)
        book.users[name] = make_user(name, _new_password(), not no_backup_admin)
        book.save()
    sys.stderr.write(f"user '{name}' saved in {users}\n")


@user_app.command("remove", cls=_Command)
def user_remove(
    name: str = typer.Argument(..., help="the user name"),
    users: Path = typer.Option(..., "--users", help="the users file"),
    verbose: bool = _verbose_option(),
) -> None:
    """Remove a user."""
    _logging(verbose)
    from engine.auth import UsersFile

    with _errors():
        book = UsersFile.load(str(users))
        if book.users.pop(name, None) is None:
            raise UsageError(f"no user '{name}' in {users}")
        book.save()
    sys.stderr.write(f"user '{name}' removed from {users}\n")


@user_app.command("list", cls=_Command)
def user_list(
    users: Path = typer.Option(..., "--users", help="the users file"),
    json_mode: bool = typer.Option(False, "--json", help="a JSON list on stdout"),
    verbose: bool = _verbose_option(),
) -> None:
    """List the users and their privileges."""
    _logging(verbose)
    from engine.auth import UsersFile

    with _errors(json_mode):
        book = UsersFile.load(str(users))
    rows = [{"user": u.name, "backup_admin": u.backup_admin}
            for u in sorted(book.users.values(), key=lambda u: u.name)]
    if json_mode:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
    else:
        for row in rows:
            sys.stdout.write(f"{row['user']}\t{'BACKUP_ADMIN' if row['backup_admin'] else '-'}"
                             "\n")


def main() -> None:
    from engine.stage import end_resource_tracker

    _take_env_password()  # before anything can start a process
    for sig in (signal.SIGINT, signal.SIGTERM):  # from here: KeyboardInterrupt
        signal.signal(sig, _interrupt)
    if _interrupted_early:
        sys.stderr.write(_INTERRUPTED)
        sys.exit(interrupted_status(_signal_seen or signal.SIGINT))
    try:
        status = _run()
    finally:
        end_resource_tracker()
    sys.exit(status)


def _usage_error(exc: click.UsageError) -> None:
    """click's usage error in MySQL's form (8001) with a hint naming the command's help,
    not click's "Usage: ... Error: ..." block; with --json, also its JSON object."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()  # no arguments at all: the help says it all
        return
    import re

    message = " ".join(exc.format_message().split())
    # click 8.5 and typer both append their suggestion to an unknown command: say it once
    message = re.sub(r"( Did you mean [^?]*\?)\1+", r"\1", message)
    err = UsageError(message)
    names: list[str] = []
    ctx: click.Context | None = exc.ctx
    while ctx is not None and ctx.parent is not None:  # the root's name is "python -m ..."
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    sys.stderr.write(err.line() + "\n")
    sys.stderr.write(f"hint: see `{' '.join(['clone-agent', *names])} --help`\n")
    if "--json" in sys.argv[1:]:
        sys.stdout.write(orjson.dumps(err.to_dict()).decode() + "\n")


def _run() -> int:
    """Run the command line; its exit status. Not click's standalone mode, whose usage
    errors typer draws in a box that wraps long lines: here they are click's plain
    ``Error: ...`` line after the usage, on stderr, exit 2."""
    try:
        status = app(standalone_mode=False)
    except KeyboardInterrupt:
        sys.stderr.write(_INTERRUPTED)
        return interrupted_status(_signal_seen)
    except click.UsageError as exc:  # the parser's: one ERROR line, as any other error
        _usage_error(exc)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # click's answer to a Ctrl-C at one of its prompts
        sys.stderr.write(_INTERRUPTED)
        return interrupted_status(signal.SIGINT)
    except Exception as exc:  # raised outside a command's body (its parsing, say)
        argv = sys.argv[1:]
        try:
            _unexpected(exc, "-v" in argv or "--verbose" in argv, "--json" in argv)
        except click.exceptions.Exit as out:
            return out.exit_code
    if status == 130:  # typer's answer to a Ctrl-C it caught before a command ran
        sys.stderr.write(_INTERRUPTED)
        return interrupted_status(signal.SIGINT)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    main()
