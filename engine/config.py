"""The clone_* variables: defaults, ranges, loading and validation.

:class:`CloneConfig` is frozen and loaded once, by the command line, with
:func:`load_config` (precedence: flag > environment ``CLONE_AGENT_<NAME>`` > TOML file >
default, as docs/cli.md says); engine code receives it and never reads ``os.environ``,
so that what a process does depends on its arguments alone. A wrong value raises
:class:`~engine.errors.WrongValueForVar`, which names the variable and its range. A name
that is no setting, a TOML key or a ``CLONE_AGENT_*`` variable, raises
:class:`~engine.errors.UnknownVariable`, as mysqld refuses to start on an unknown
variable in its option file: a misspelt setting is never silently ignored. MySQL's clone
variables that this build does not implement (clone_block_ddl,
clone_delay_after_data_drop, clone_ssl_ca,
clone_ssl_cert, clone_ssl_key) and REQUIRE SSL are not settings: they are refused the
same way, with a hint that says so.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import (
    ConfigError,
    InvalidDonorList,
    SysConfig,
    UnknownVariable,
    WrongValueForVar,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str | int) -> int:
    """``64MiB``, ``2GiB``, ``512KiB``, ``4M`` or plain bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes or a suffix such as 64MiB)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


_RATE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?)?\s*(/s)?\s*$", re.IGNORECASE)


def parse_bandwidth(text: str | int) -> int:
    """A bandwidth -> whole MiB/s, as MySQL's clone_max_*_bandwidth count it: a plain
    number is MiB/s (``100``); a suffix is binary (``100M``, ``100MiB/s``, ``1G`` = 1024,
    ``2048K`` = 2). A value that is not a whole number of MiB/s is refused, not rounded."""
    if isinstance(text, int):
        return text
    m = _RATE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a bandwidth: {text!r} (MiB/s, or a suffix such as 1G)")
    unit = (m.group(2) or "M").upper()[:1]
    nbytes = int(m.group(1)) * _UNITS[unit]
    if nbytes % MiB:
        raise ValueError(f"not a whole number of MiB/s: {text!r}")
    return nbytes // MiB


@dataclass(frozen=True)
class Variable:
    """One clone_* variable: its type, default and range, as MySQL defines them."""

    name: str
    kind: type
    default: Any
    low: int | None = None
    high: int | None = None
    unit: str = ""

    def describe_range(self) -> str:
        if self.kind is bool:
            return "ON or OFF"
        if self.unit == "MiB/s":
            return f"{self.low} to {self.high} MiB/s (or a suffix: 100M, 1G)"
        if self.low is not None:
            return f"{self.low} to {self.high}{(' ' + self.unit) if self.unit else ''}"
        return "a string"


VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable("autotune_concurrency", bool, True),
        Variable("buffer_size", int, 4 * MiB, 1 * MiB, 256 * MiB, "bytes"),
        Variable("ddl_timeout", int, 300, 0, 2592000, "seconds"),
        Variable("donor_timeout_after_network_failure", int, 5, 0, 30, "minutes"),
        Variable("enable_compression", bool, False),
        Variable("max_concurrency", int, 16, 1, 128),
        Variable("max_data_bandwidth", int, 0, 0, 1048576, "MiB/s"),
        Variable("max_network_bandwidth", int, 0, 0, 1048576, "MiB/s"),
        Variable("valid_donor_list", str, ""),
        # Our own, not MySQL's: the codec used when enable_compression is ON.
        Variable("compression_algorithm", str, "lz4"),
    )
}


#: MySQL's clone settings (and REQUIRE SSL) that this build does not implement. They are
#: not settings: a TOML key or ``CLONE_AGENT_*`` variable naming one is refused, with a
#: hint that says so, rather than accepted and ignored.
NOT_IMPLEMENTED = frozenset({
    "block_ddl", "delay_after_data_drop",
    "ssl_ca", "ssl_cert", "ssl_key", "require_ssl",
})

ENV_PREFIX = "CLONE_AGENT_"

#: ``CLONE_AGENT_*`` variables that are not settings, and who reads them: the password
#: (clone_agent/cli.py, which takes it out of the environment), the folder of status
#: records (clone_agent/cli.py), bench/'s folder (bench/suite.py) and
#: the test suite's process tag (tests/conftest.py).
OTHER_ENVIRONMENT = frozenset({
    "CLONE_AGENT_PASSWORD", "CLONE_AGENT_STATE_DIR", "CLONE_AGENT_BENCH_DIR",
    "CLONE_AGENT_TEST_TAG", "CLONE_AGENT_CONFIG",
})


@dataclass(frozen=True)
class CloneConfig:
    """The values a clone runs with. Field names are the clone_* names without the prefix."""

    autotune_concurrency: bool = True
    buffer_size: int = 4 * MiB
    ddl_timeout: int = 300
    donor_timeout_after_network_failure: int = 5  #: minutes
    enable_compression: bool = False
    max_concurrency: int = 16
    max_data_bandwidth: int = 0
    max_network_bandwidth: int = 0
    valid_donor_list: str = ""
    compression_algorithm: str = "lz4"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bad(var: Variable, value: Any) -> WrongValueForVar:
    return WrongValueForVar(
        f"clone_{var.name}", value, hint=f"clone_{var.name} takes {var.describe_range()}"
    )


def coerce(name: str, value: Any) -> Any:
    """Turn a flag, environment or TOML value into the variable's type, or raise 1231."""
    var = VARIABLES[name]
    if var.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "on", "true", "yes"):
            return True
        if text in ("0", "off", "false", "no"):
            return False
        raise _bad(var, value)
    if var.kind is int:
        if isinstance(value, bool):
            raise _bad(var, value)
        try:
            number = parse_size(value) if var.unit == "bytes" else \
                parse_bandwidth(value) if var.unit == "MiB/s" else int(str(value).strip())
        except ValueError:
            raise _bad(var, value) from None
        assert var.low is not None and var.high is not None
        if not var.low <= number <= var.high:
            raise _bad(var, value)
        return number
    text = str(value)
    if name == "compression_algorithm" and text not in ("lz4", "zstd"):
        raise WrongValueForVar("clone_compression_algorithm", value, hint="use lz4 or zstd")
    if name == "valid_donor_list" and text:
        parse_donor_list(text)
    return text


def _unknown(key: str, where: str, name: str, spell: Callable[[str], str]) -> UnknownVariable:
    """The error for ``key`` (as the user wrote it), which would name setting ``name``;
    ``spell`` writes a setting's name in the same form (TOML key or environment variable)."""
    if name in NOT_IMPLEMENTED:
        hint = f"{key} is not implemented in this build: remove it"
    else:
        close = difflib.get_close_matches(name, VARIABLES, n=1)
        known = ", ".join(spell(n) for n in VARIABLES)
        hint = (f"did you mean {spell(close[0])}? " if close else "") + f"known: {known}"
    return UnknownVariable(f"unknown variable '{key}' {where}", hint=hint)


def _clone_name(name: str) -> str:
    return "clone_" + name


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _read_toml(path: str | Path) -> dict[str, Any]:
    """A configuration file's contents; every way it cannot be read is ERROR 8010."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror or exc}",
                          hint="--config takes a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _toml_values(path: Path) -> dict[str, Any]:
    """The settings of a TOML file: its ``[clone]`` table, or else its top-level keys
    (other programs' tables beside them are left alone). Every key must name a setting."""
    data = _read_toml(path)
    strict = "clone" in data
    table = data["clone"] if strict else data
    if not isinstance(table, dict):
        raise UnknownVariable(f"'clone' in {path} is not a table",
                              hint="write the settings under a [clone] header")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.removeprefix("clone_").replace("-", "_")
        if name in VARIABLES:
            out[name] = value
        elif strict or not isinstance(value, dict):
            spell: Callable[[str], str] = _clone_name if key.startswith("clone_") else str
            raise _unknown(key, f"in {path}", name, spell)
    return out


def _environment_values(environ: Mapping[str, str],
                        warn: Callable[[UnknownVariable], None] | None = None
                        ) -> dict[str, str]:
    """The settings given as ``CLONE_AGENT_<NAME>``; any other ``CLONE_AGENT_*`` name
    that is not in :data:`OTHER_ENVIRONMENT` is said, never silently ignored: to
    ``warn`` when given (the command line prints it and goes on, since the environment
    is shared with everything else the user runs), else refused. An empty value counts
    as not set."""
    out: dict[str, str] = {}
    for key in sorted(environ):  # sorted: the same variable is reported first every time
        if not key.startswith(ENV_PREFIX) or key in OTHER_ENVIRONMENT:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in VARIABLES or key != _env_name(name):
            err = _unknown(key, "in the environment", name, _env_name)
            if warn is None:
                raise err
            warn(err)
            continue
        if environ[key] != "":
            out[name] = environ[key]
    return out


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: str | Path | None = None,
    warn: Callable[[UnknownVariable], None] | None = None,
) -> CloneConfig:
    """Flag > environment (``CLONE_AGENT_MAX_CONCURRENCY``) > TOML > default.

    ``flags`` holds only the options the user actually gave (None means not given).
    ``environ`` is the whole environment: every ``CLONE_AGENT_*`` name in it is checked;
    an unknown one goes to ``warn`` when given, else it is refused. A value overridden
    by a flag is not checked: what the user typed last wins, and only it must be valid.
    """
    values: dict[str, Any] = {}
    given = {name for name, value in (flags or {}).items() if value is not None}
    if toml_path:
        for name, value in _toml_values(Path(toml_path)).items():
            if name not in given:
                values[name] = coerce(name, value)
    for name, env_value in _environment_values(environ or {}, warn).items():
        if name not in given:
            values[name] = coerce(name, env_value)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = coerce(name, value)
    return CloneConfig(**values)


_HOST_RE = re.compile(r"^[A-Za-z0-9._\-\[\]:]+$")


def parse_donor_list(text: str) -> list[tuple[str, int]]:
    """clone_valid_donor_list: ``HOST:PORT[,HOST:PORT...]``, no spaces, port all digits.

    Hosts are compared lowercased and exactly, as MySQL does.
    """
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        host, sep, port = item.rpartition(":")
        if (
            not sep
            or not host
            or not port.isdigit()
            or " " in item
            or not _HOST_RE.match(host)
            or not 0 < int(port) < 65536
        ):
            raise InvalidDonorList(
                "Invalid Format",
                hint=f"clone_valid_donor_list entry {item!r}: use HOST:PORT[,HOST:PORT...], "
                "no spaces",
            )
        out.append((host.lower(), int(port)))
    return out


def check_valid_donor(config: CloneConfig, host: str, port: int) -> None:
    """Raise ERROR 3869 when a donor list is set and this donor is not in it."""
    if not config.valid_donor_list:
        return
    allowed = parse_donor_list(config.valid_donor_list)
    if (host.lower(), port) not in allowed:
        raise SysConfig(
            f"{host}:{port} is not found in clone_valid_donor_list: {config.valid_donor_list}",
            hint="add the donor to --valid-donor-list (clone_valid_donor_list)",
        )


#: What a ``[serve]`` table of the configuration file may set: the options of
#: ``clone-agent serve`` (a flag on the command line wins), with their types.
SERVE_KEYS: dict[str, type] = {
    "bind": str, "users": str, "key": str, "require_secure_transport": bool,
    "allow_anonymous": bool, "workload": int, "readers": int, "ddl_every": float,
    "metrics_addr": str,
}


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """The ``[serve]`` table of a TOML file (``{}`` without one), every key checked."""
    table = _read_toml(path).get("serve", {})
    if not isinstance(table, dict):
        raise ConfigError(f"'serve' in {path} is not a table",
                          hint="write serve's settings under a [serve] header")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        kind = SERVE_KEYS.get(name)
        if kind is None:
            close = difflib.get_close_matches(name, SERVE_KEYS, n=1)
            raise UnknownVariable(f"unknown variable '{key}' in [serve] of {path}",
                                  hint=(f"did you mean {close[0]}? " if close else "") +
                                  "known: " + ", ".join(SERVE_KEYS))
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise ConfigError(f"'{key}' in [serve] of {path} is not a {kind.__name__}")
        out[name] = value
    return out
