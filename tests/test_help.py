"""``--help`` of every command: readable at 80 columns, every option described and no
option name cut; ``-h``, ``--version`` and ``-V``; usage errors in MySQL's form."""

from __future__ import annotations

import json

import click
import pytest
import typer.main

from clone_agent.cli import _argument_help, app
from tests.helpers import run_cli


def _commands() -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []

    def walk(path: tuple[str, ...], cmd: click.Command) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk((*path, name), sub)
        else:
            out.append((path, cmd))

    walk((), typer.main.get_command(app))
    return out


COMMANDS = _commands()


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_at_80_columns_describes_every_option(path: tuple[str, ...],
                                                   cmd: click.Command) -> None:
    res = run_cli(*path, "--help", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():
        assert len(line) <= 80, line
    assert "…" not in res.stdout and "\\[" not in res.stdout
    _argument_help(cmd)  # as the command does before it draws its help
    for param in cmd.params:
        if isinstance(param, click.Option) and param.hidden:
            continue
        for name in (*param.opts, *param.secondary_opts):
            if isinstance(param, click.Option):
                assert name in res.stdout, (path, name)
        assert getattr(param, "help", None), (path, param.name, "has no description")


def test_short_help_and_version() -> None:
    assert run_cli("pull", "-h").stdout == run_cli("pull", "--help").stdout
    for flag in ("--version", "-V"):
        res = run_cli(flag)
        assert res.returncode == 0 and res.stdout.startswith("clone-agent 0."), res


def test_a_usage_error_is_one_error_line_and_a_hint() -> None:
    res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", "/x/y", "--zzz", "--json")
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["ERROR 8001 (HY000): No such option '--zzz'.",
                                       "hint: see `clone-agent pull --help`"], res.stderr
    assert "Usage:" not in res.stderr and "╭" not in res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["error_no"] == 8001
    res = run_cli("statux")
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "ERROR 8001 (HY000): No such command 'statux'. Did you mean 'status'?",
        "hint: see `clone-agent --help`"], res.stderr


@pytest.mark.parametrize("value,ok", [("100", True), ("100M", True), ("1G", True),
                                      ("100MiB/s", True), ("512K", False), ("lots", False)])
def test_bandwidth_takes_units(tmp_path, value: str, ok: bool) -> None:
    from engine.config import load_config

    if ok:
        cfg = load_config({"max_data_bandwidth": value}, {})
        assert cfg.max_data_bandwidth == {"100": 100, "100M": 100, "1G": 1024,
                                          "100MiB/s": 100}[value]
    else:
        res = run_cli("pull", "u@127.0.0.1:1", "--data-dir", str(tmp_path / "c"),
                      "--max-network-bandwidth", value)
        assert res.returncode == 2 and "ERROR 1231" in res.stderr, res.stderr
        assert "clone_max_network_bandwidth" in res.stderr
