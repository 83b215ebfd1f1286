"""The command line's own rules, on the real CLI in a subprocess: the catch-all for an
unexpected exception (ERROR 8000, a traceback only with -v, never local variables),
options that are not implemented are not offered, a repeated option is a usage error,
and settings that name nothing are refused."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from engine.status import STATUS_DIR, STATUS_FILE
from tests.helpers import run_cli

PASSWORD = "cli-test-password-7f3a9c"


def _corrupt_status(tmp_path: Path) -> tuple[Path, str]:
    """A destination whose status file is not JSON: ``status`` fails with an exception
    nobody translated, in the real code (a genuine case, not a planted fault). Returns
    the destination and the decoder's message."""
    dest = tmp_path / "dest"
    (dest / STATUS_DIR).mkdir(parents=True)
    (dest / STATUS_DIR / STATUS_FILE).write_bytes(b"{\n")
    try:
        orjson.loads(b"{\n")
    except orjson.JSONDecodeError as exc:
        return dest, str(exc)
    raise AssertionError("orjson accepted '{'")


def test_an_unexpected_error_is_error_8000_without_a_traceback(tmp_path: Path) -> None:
    dest, message = _corrupt_status(tmp_path)
    res = run_cli("status", str(dest), env={"CLONE_AGENT_PASSWORD": PASSWORD})
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"ERROR 8000 (HY000): JSONDecodeError: {message}",
        "hint: rerun with -v for the traceback",
    ]
    assert res.stdout == ""


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_shows_the_traceback_and_no_local_variable(tmp_path: Path, flag: str) -> None:
    dest, message = _corrupt_status(tmp_path)
    res = run_cli("status", str(dest), flag, env={"CLONE_AGENT_PASSWORD": PASSWORD})
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2] == f"orjson.JSONDecodeError: {message}"
    assert lines[-1] == f"ERROR 8000 (HY000): JSONDecodeError: {message}"
    assert not any(line.startswith("hint: ") for line in lines)
    # Python's standard form: file, line, code. typer's pretty form would add a box of
    # each frame's locals (dest = ..., state_dir = ..., and in pull the password).
    assert "locals" not in res.stderr and "╭" not in res.stderr
    assert "state_dir =" not in res.stderr and "json_mode =" not in res.stderr
    assert PASSWORD not in res.stderr and PASSWORD not in res.stdout


def test_an_unexpected_error_with_json_ends_with_its_object(tmp_path: Path) -> None:
    dest, message = _corrupt_status(tmp_path)
    res = run_cli("status", str(dest), "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout.splitlines()[-1]) == {
        "error_no": 8000, "error_message": f"JSONDecodeError: {message}"}
    assert res.stderr.splitlines()[0] == f"ERROR 8000 (HY000): JSONDecodeError: {message}"


@pytest.mark.parametrize("value", ["31", "-1", "five"])
def test_the_restart_window_is_minutes_from_0_to_30(value: str) -> None:
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", "/x/y",
                  "--donor-timeout-after-network-failure", value)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("ERROR "), res.stderr
    assert "donor_timeout_after_network_failure" in res.stderr or \
        "--donor-timeout-after-network-failure" in res.stderr


def test_pull_needs_a_data_dir_or_a_replace() -> None:
    res = run_cli("pull", "u@127.0.0.1:1")
    assert res.returncode == 2
    assert res.stderr.splitlines()[0] == \
        "ERROR 8001 (HY000): give exactly one of --data-dir DIR, --replace DATADIR and --resume DIR"


@pytest.mark.parametrize("args,message", [
    (("pull", "u@127.0.0.1:1", "--data-dir", "{A}", "--data-dir", "{B}"),
     "option '--data-dir' given twice"),
    (("pull", "u@127.0.0.1:1", "--data-dir={A}", "--data-dir", "{B}"),
     "option '--data-dir' given twice"),
    (("pull", "u@127.0.0.1:1", "--data-dir", "{A}", "--json", "--json"),
     "option '--json' given twice"),
    (("pull", "u@127.0.0.1:1", "--data-dir", "{A}", "-v", "--verbose"),
     "option '-v/--verbose' given twice"),
    (("pull", "u@127.0.0.1:1", "--data-dir", "{A}", "--enable-compression",
      "--no-enable-compression"),
     "option '--enable-compression/--no-enable-compression' given twice"),
    (("pull", "u@127.0.0.1:1", "--data-dir", "{A}", "--max-concurrency", "2",
      "--max-concurrency", "3", "--max-concurrency", "4"),
     "option '--max-concurrency' given 3 times"),
    (("clone-local", "{S}", "--data-dir", "{A}", "--data-dir", "{B}"),
     "option '--data-dir' given twice"),
    (("serve", "{S}", "--bind", "127.0.0.1:1", "--bind", "127.0.0.1:2"),
     "option '--bind' given twice"),
    (("init", "{A}", "--size", "16MiB", "--size", "32MiB"), "option '--size' given twice"),
    (("status", "{A}", "--json", "--json"), "option '--json' given twice"),
    (("verify", "{S}", "--json", "--json"), "option '--json' given twice"),
    (("workload", "{S}", "--rate", "1", "--rate", "2"), "option '--rate' given twice"),
])
def test_a_repeated_option_is_a_usage_error(tmp_path: Path, args: tuple[str, ...],
                                            message: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    paths = {"{A}": str(tmp_path / "a"), "{B}": str(tmp_path / "b"), "{S}": str(src)}
    for key, value in paths.items():
        args = tuple(a.replace(key, value) for a in args)
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[0] == f"ERROR 8001 (HY000): {message}"
    # nothing ran: no "ready", no output of the command; with --json, the error's object
    expected = json.dumps({"error_no": 8001, "error_message": message}, separators=(",", ":"))
    assert res.stdout in ("", expected + "\n")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_help_given_twice_is_still_help() -> None:
    res = run_cli("pull", "--help", "--help")
    assert res.returncode == 0 and "--data-dir" in res.stdout


@pytest.mark.parametrize(("command", "argument"), [("pull", "SOURCE"), ("kill", "DEST"),
                                                   ("clone-local", "DATADIR")])
def test_help_lists_each_argument_once_with_its_help(command: str, argument: str) -> None:
    res = run_cli(command, "--help")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip().startswith(argument)]
    assert len(lines) == 1 and "[required]" in lines[0], res.stdout


def test_a_misspelt_setting_in_the_environment_is_a_warning(tmp_path: Path) -> None:
    """The environment is shared with everything else: a name that is no setting is
    said (with the closest one), and the command goes on without it."""
    dest = tmp_path / "c"
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(dest), "--connect-timeout",
                  "1", env={"CLONE_AGENT_MAX_CONCURENCY": "3"})
    err = res.stderr.splitlines()
    assert err[0].startswith("warning: unknown variable 'CLONE_AGENT_MAX_CONCURENCY' in the "
                             "environment (did you mean CLONE_AGENT_MAX_CONCURRENCY?")
    assert res.returncode == 5  # it went on, to a donor that is not there
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(dest), "--connect-timeout",
                  "1", env={"CLONE_AGENT_SSL_CA": "/k.pub"})
    assert res.stderr.splitlines()[0] == (
        "warning: unknown variable 'CLONE_AGENT_SSL_CA' in the environment "
        "(CLONE_AGENT_SSL_CA is not implemented in this build: remove it)")
    assert not dest.exists()


def test_a_flag_overrides_an_invalid_environment_value(tmp_path: Path) -> None:
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(tmp_path / "c"),
                  "--max-concurrency", "2", "--connect-timeout", "1",
                  env={"CLONE_AGENT_MAX_CONCURRENCY": "many"})
    assert "1231" not in res.stderr and res.returncode == 5, res.stderr


def test_the_default_config_file(tmp_path: Path) -> None:
    """Without --config: $CLONE_AGENT_CONFIG, else $XDG_CONFIG_HOME/clone-agent/config.toml."""
    conf = tmp_path / "xdg" / "clone-agent"
    conf.mkdir(parents=True)
    (conf / "config.toml").write_text("[clone]\nmax_concurrency = 999\n")
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(tmp_path / "c"),
                  env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert res.returncode == 2 and "ERROR 1231" in res.stderr, res.stderr  # it was read
    named = tmp_path / "named.toml"
    named.write_text("[clone]\nmax_concurrency = 0\n")
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(tmp_path / "c"),
                  env={"XDG_CONFIG_HOME": str(tmp_path / "xdg"),
                       "CLONE_AGENT_CONFIG": str(named)})
    assert res.returncode == 2 and "'0'" in res.stderr, res.stderr  # the named one wins


def test_an_unknown_key_in_the_config_file_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "clone.toml"
    toml.write_text("[clone]\nmax_concurrency = 4\nblock_ddl = true\n")
    dest = tmp_path / "c"
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(dest), "--config", str(toml))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "ERROR 8010 (HY000): Configuration error: unknown variable 'block_ddl' "
        f"in {toml}",
        "hint: block_ddl is not implemented in this build: remove it",
    ]
    assert not dest.exists()


def test_serve_takes_its_options_from_the_config_file(tmp_path: Path) -> None:
    """[serve] sets serve's options; a flag on the command line wins; a key that is no
    option is refused with the closest one."""
    import selectors
    import subprocess

    from tests.helpers import CLI, ROOT, free_port

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    port = free_port()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[serve]\nbind = "127.0.0.1:{port}"\nallow_anonymous = true\n'
                    'readers = 1\n')
    proc = subprocess.Popen([*CLI, "serve", str(src), "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(30), "serve did not start"
        assert proc.stdout.readline().strip() == f"ready 127.0.0.1:{port}"
        res = run_cli("pull", f"u@127.0.0.1:{port}", "--data-dir", str(tmp_path / "c"))
        assert res.returncode == 0, res.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    conf.write_text('[serve]\nbindd = "127.0.0.1:1"\n')
    res = run_cli("serve", str(src), "--config", str(conf), "--allow-anonymous")
    assert res.returncode == 2
    assert "unknown variable 'bindd'" in res.stderr and "did you mean bind?" in res.stderr
    res = run_cli("serve", str(src), "--allow-anonymous")
    assert res.returncode == 2 and "serve needs --bind HOST:PORT" in res.stderr
