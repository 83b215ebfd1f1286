"""The exit statuses: the README's error table holds the same numbers as the code's one
table (engine/errors.py), and each status comes from its cause in a real process."""

from __future__ import annotations

import re
from pathlib import Path

from engine import errors as E
from tests.helpers import ROOT, free_port, run_cli

#: Numbers defined for parity with MySQL's clone plugin but raised nowhere yet: the
#: README lists only what a user can meet.
NEVER_RAISED = {3633, 3864, 3865, 3866, 3868}


def _readme_exits() -> dict[int, set[int]]:
    """{error number: the exit statuses the README's error table gives it}."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| error | SQLSTATE | message | exit | when |"):]
    out: dict[int, set[int]] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        number, exits = int(cells[0]), cells[3]
        out.setdefault(number, set()).update(int(x) for x in re.findall(r"\d+", exits))
    return out


def _code_exits() -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for cls, status in E.EXIT_STATUS_TABLE.items():
        if cls is E.CloneError:
            continue  # the base class: its number is Unexpected's, 8000
        statuses = {E.EXIT_SIGINT, E.EXIT_SIGTERM} if cls is E.QueryInterrupted else {status}
        out.setdefault(cls.errno, set()).update(statuses)
    return out


def test_the_readme_table_is_the_code_table() -> None:
    readme, code = _readme_exits(), _code_exits()
    assert set(readme) == set(code) - NEVER_RAISED, "README rows differ from the classes"
    for number, statuses in readme.items():
        assert statuses == code[number], (number, statuses, code[number])


def test_the_readme_lists_every_exit_status() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Exit status"):]
    listed = set(int(n) for n in re.findall(r"^\| (\d+)(?:, \d+)? \|", section, re.M))
    listed |= set(int(n) for n in re.findall(r"^\| \d+, (\d+) \|", section, re.M))
    assert listed >= {0, 1, 2, 3, 4, 5, 6, 130, 143}
    assert set().union(*_code_exits().values()) <= listed


def test_usage_is_2() -> None:
    res = run_cli("pull", "no-at-sign", "--data-dir", "/nonexistent/x")
    assert res.returncode == E.EXIT_USAGE, res.stderr
    assert "ERROR 8001" in res.stderr


def test_a_refused_destination_is_3(tmp_path: Path) -> None:
    res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(tmp_path))
    assert res.returncode == E.EXIT_REFUSED == 3 and "ERROR 1007" in res.stderr
    res = run_cli("verify", str(tmp_path))
    assert res.returncode == 3 and "ERROR 8004" in res.stderr, res.stderr


def test_a_configuration_error_is_8010_and_2(tmp_path: Path) -> None:
    res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "c"),
                  "--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "ERROR 8010 (HY000): Configuration error:" in res.stderr


def test_an_unreachable_donor_is_5(tmp_path: Path) -> None:
    res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "c"))
    assert res.returncode == E.EXIT_UNREACHABLE == 5, res.stderr
    assert "ERROR 3862 (HY000): Clone Donor Error: Connect failed: 2003" in res.stderr
