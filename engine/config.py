"""The clone_* variables: defaults, ranges, loading and validation.

:class:`CloneConfig` is frozen and loaded once, by the command line, with
:func:`load_config` (precedence: flag > environment ``CLONE_AGENT_<NAME>`` > TOML file
> default, as CLI.md says); engine code receives it and never reads ``os.environ``
(STYLE.md 10). A wrong value raises :class:`~engine.errors.WrongValueForVar`, which
names the variable and its range.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidDonorList, SysConfig, WrongValueForVar

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
        if self.low is not None:
            return f"{self.low} to {self.high}{(' ' + self.unit) if self.unit else ''}"
        return "a string"


VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable("autotune_concurrency", bool, True),
        Variable("block_ddl", bool, False),
        Variable("buffer_size", int, 4 * MiB, 1 * MiB, 256 * MiB, "bytes"),
        Variable("ddl_timeout", int, 300, 0, 2592000, "seconds"),
        Variable("delay_after_data_drop", int, 0, 0, 3600, "seconds"),
        Variable("donor_timeout_after_network_failure", int, 5, 0, 30, "minutes"),
        Variable("enable_compression", bool, False),
        Variable("max_concurrency", int, 16, 1, 128),
        Variable("max_data_bandwidth", int, 0, 0, 1048576, "MiB/s"),
        Variable("max_network_bandwidth", int, 0, 0, 1048576, "MiB/s"),
        Variable("ssl_ca", str, ""),
        Variable("ssl_cert", str, ""),
        Variable("ssl_key", str, ""),
        Variable("valid_donor_list", str, ""),
        # Our own, not MySQL's: the codec used when enable_compression is ON.
        Variable("compression_algorithm", str, "lz4"),
    )
}


@dataclass(frozen=True)
class CloneConfig:
    """The values a clone runs with. Field names are the clone_* names without the prefix."""

    autotune_concurrency: bool = True
    block_ddl: bool = False
    buffer_size: int = 4 * MiB
    ddl_timeout: int = 300
    delay_after_data_drop: int = 0
    donor_timeout_after_network_failure: int = 5
    enable_compression: bool = False
    max_concurrency: int = 16
    max_data_bandwidth: int = 0
    max_network_bandwidth: int = 0
    ssl_ca: str = ""
    ssl_cert: str = ""
    ssl_key: str = ""
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
            number = parse_size(value) if var.unit == "bytes" else int(str(value).strip())
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


def _toml_values(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SysConfig(f"configuration file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SysConfig(f"configuration file {path} is not valid TOML: {exc}") from None
    table = data.get("clone", data)
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.removeprefix("clone_").replace("-", "_")
        if name in VARIABLES:
            out[name] = value
        elif not isinstance(value, dict):
            raise SysConfig(
                f"unknown variable '{key}' in {path}",
                hint="known: " + ", ".join("clone_" + n for n in VARIABLES),
            )
    return out


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: str | Path | None = None,
) -> CloneConfig:
    """Flag > environment (``CLONE_AGENT_MAX_CONCURRENCY``) > TOML > default.

    ``flags`` holds only the options the user actually gave (None means not given).
    """
    values: dict[str, Any] = {}
    if toml_path:
        for name, value in _toml_values(Path(toml_path)).items():
            values[name] = coerce(name, value)
    for name in VARIABLES:
        env_value = (environ or {}).get("CLONE_AGENT_" + name.upper())
        if env_value is not None and env_value != "":
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
