from pathlib import Path

import pytest

from engine.config import (
    NOT_IMPLEMENTED,
    OTHER_ENVIRONMENT,
    VARIABLES,
    CloneConfig,
    MiB,
    check_valid_donor,
    load_config,
    parse_donor_list,
    parse_size,
)
from engine.errors import ConfigError, SysConfig, UnknownVariable, WrongValueForVar


def test_defaults_are_mysqls() -> None:
    c = CloneConfig()
    assert c.max_concurrency == 16 and c.autotune_concurrency
    assert c.buffer_size == 4 * MiB and c.ddl_timeout == 300
    assert c.max_data_bandwidth == 0 and c.max_network_bandwidth == 0
    assert not c.enable_compression and c.valid_donor_list == ""
    assert load_config() == c
    assert set(VARIABLES) == set(CloneConfig.__dataclass_fields__)


def test_sizes() -> None:
    assert parse_size("64MiB") == 64 * MiB
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512KiB") == 512 << 10
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[clone]\nmax_concurrency = 3\nclone_ddl_timeout = 7\nbuffer_size = '8MiB'\n")
    env = {"CLONE_AGENT_MAX_CONCURRENCY": "5", "CLONE_AGENT_ENABLE_COMPRESSION": "ON"}
    c = load_config({}, {}, toml)
    assert (c.max_concurrency, c.ddl_timeout, c.buffer_size) == (3, 7, 8 * MiB)
    c = load_config({}, env, toml)
    assert c.max_concurrency == 5 and c.enable_compression and c.ddl_timeout == 7
    c = load_config({"max_concurrency": 9, "ddl_timeout": None}, env, toml)
    assert c.max_concurrency == 9 and c.ddl_timeout == 7


@pytest.mark.parametrize("name,value", [
    ("max_concurrency", 0), ("max_concurrency", 129), ("buffer_size", "512KiB"),
    ("ddl_timeout", -1),
    ("max_data_bandwidth", 1048577), ("enable_compression", "maybe"),
    ("max_concurrency", "many"),
])
def test_wrong_values_name_the_variable_and_range(name: str, value: object) -> None:
    with pytest.raises(WrongValueForVar) as info:
        load_config({name: value})
    err = info.value
    assert err.errno == 1231 and f"clone_{name}" in err.message
    assert err.hint and f"clone_{name} takes" in err.hint


def test_env_value_checked_too() -> None:
    with pytest.raises(WrongValueForVar):
        load_config({}, {"CLONE_AGENT_MAX_CONCURRENCY": "500"})


def test_unknown_toml_key(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_concurency = 3\n")
    with pytest.raises(UnknownVariable) as info:
        load_config({}, {}, toml)
    err = info.value
    assert err.line() == ("ERROR 8010 (HY000): Configuration error: unknown variable "
                          f"'max_concurency' in {toml}")
    assert err.exit_status == 2 and err.hint is not None
    assert err.hint.startswith("did you mean max_concurrency? known: autotune_concurrency, ")
    toml.write_text("[clone]\nclone_max_concurency = 3\n")
    with pytest.raises(UnknownVariable) as info:
        load_config({}, {}, toml)
    assert info.value.hint is not None
    assert info.value.hint.startswith("did you mean clone_max_concurrency? known: clone_")


def test_a_clone_table_holds_only_settings(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    # beside the settings, other programs' tables are left alone ...
    toml.write_text("max_concurrency = 3\n[mysqld]\nport = 3306\n")
    assert load_config({}, {}, toml).max_concurrency == 3
    # ... but inside [clone] every key is a setting
    toml.write_text("[clone]\nmax_concurrency = 3\n[clone.extra]\nx = 1\n")
    with pytest.raises(UnknownVariable, match="unknown variable 'extra'"):
        load_config({}, {}, toml)
    toml.write_text("clone = 3\n")
    with pytest.raises(UnknownVariable, match="is not a table"):
        load_config({}, {}, toml)


def test_a_config_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, {}, tmp_path)
    assert info.value.message == (f"Configuration error: configuration file {tmp_path} "
                                  "cannot be read: Is a directory")
    assert info.value.errno == 8010 and info.value.exit_status == 2
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, {}, tmp_path / "missing.toml")


def test_settings_that_do_nothing_are_not_settings(tmp_path: Path) -> None:
    assert NOT_IMPLEMENTED == {"block_ddl", "delay_after_data_drop", "ssl_ca", "ssl_cert",
                               "ssl_key", "require_ssl"}
    assert not NOT_IMPLEMENTED & set(VARIABLES)
    assert not NOT_IMPLEMENTED & set(CloneConfig.__dataclass_fields__)
    toml = tmp_path / "c.toml"
    for name in sorted(NOT_IMPLEMENTED):
        toml.write_text(f"[clone]\nclone_{name} = 1\n")
        with pytest.raises(UnknownVariable) as info:
            load_config({}, {}, toml)
        assert info.value.hint == f"clone_{name} is not implemented in this build: remove it"
        env = "CLONE_AGENT_" + name.upper()
        with pytest.raises(UnknownVariable) as info:
            load_config({}, {env: "1"})
        assert info.value.line() == ("ERROR 8010 (HY000): Configuration error: "
                                     f"unknown variable '{env}' in the environment")
        assert info.value.hint == f"{env} is not implemented in this build: remove it"


def test_a_misspelt_environment_variable_is_a_warning_when_asked() -> None:
    said: list[str] = []
    config = load_config({}, {"CLONE_AGENT_MAX_CONCURENCY": "3"},
                         warn=lambda err: said.append(err.args_[0]))
    assert config.max_concurrency == 16
    assert said == ["unknown variable 'CLONE_AGENT_MAX_CONCURENCY' in the environment"]


def test_a_misspelt_environment_variable_is_refused() -> None:
    with pytest.raises(UnknownVariable) as info:
        load_config({}, {"CLONE_AGENT_MAX_CONCURENCY": "3"})
    assert info.value.line() == ("ERROR 8010 (HY000): Configuration error: unknown "
                                 "variable 'CLONE_AGENT_MAX_CONCURENCY' in the environment")
    assert info.value.hint is not None
    assert info.value.hint.startswith("did you mean CLONE_AGENT_MAX_CONCURRENCY? known: "
                                      "CLONE_AGENT_AUTOTUNE_CONCURRENCY, ")
    # environment names are case-sensitive: a lowercase one is not the setting
    with pytest.raises(UnknownVariable, match="CLONE_AGENT_max_concurrency"):
        load_config({}, {"CLONE_AGENT_max_concurrency": "3"})


def test_the_environment_beside_the_settings() -> None:
    env = {name: "x" for name in OTHER_ENVIRONMENT}
    env.update({"HOME": "/root", "CLONE_AGENTX": "1", "MY_CLONE_AGENT_FOO": "1",
                "CLONE_AGENT_DDL_TIMEOUT": ""})  # empty: not set
    assert load_config({}, env) == CloneConfig()
    assert OTHER_ENVIRONMENT == {"CLONE_AGENT_PASSWORD", "CLONE_AGENT_STATE_DIR",
                                 "CLONE_AGENT_BENCH_DIR", "CLONE_AGENT_TEST_TAG",
                                 "CLONE_AGENT_CONFIG"}


def test_donor_list_format() -> None:
    assert parse_donor_list("127.0.0.1:3310,Host.Example:1") == [
        ("127.0.0.1", 3310), ("host.example", 1)]
    for bad in ("127.0.0.1", "h:p", "a:1, b:2", "a:1,,b:2", ":3306", "a:99999"):
        with pytest.raises(SysConfig) as info:
            parse_donor_list(bad)
        assert "Invalid Format" in info.value.message


def test_donor_must_be_listed() -> None:
    c = CloneConfig(valid_donor_list="127.0.0.1:3310")
    check_valid_donor(c, "127.0.0.1", 3310)
    with pytest.raises(SysConfig) as info:
        check_valid_donor(c, "10.0.0.5", 3310)
    assert info.value.line() == ("ERROR 3869 (HY000): Clone system configuration: 10.0.0.5:3310 "
                                 "is not found in clone_valid_donor_list: 127.0.0.1:3310")
    check_valid_donor(CloneConfig(valid_donor_list="LOCALHOST:1"), "localhost", 1)
