import signal

import pytest

from engine import errors as E


def test_numbers_and_messages_follow_mysql() -> None:
    assert E.DatabaseExists("/x").line() == (
        "ERROR 1007 (HY000): Can't create database '/x'; database exists")
    assert E.TooManyClones(1).message == (
        "Too many concurrent clone operations. Maximum allowed - 1.")
    assert E.DonorError("boom").line() == "ERROR 3862 (HY000): Clone Donor Error: boom."
    assert E.SysConfig("a:1 is not found in clone_valid_donor_list: b:2").line() == (
        "ERROR 3869 (HY000): Clone system configuration: a:1 is not found in "
        "clone_valid_donor_list: b:2")
    assert E.QueryInterrupted().line() == "ERROR 1317 (70100): Query execution was interrupted"
    assert E.LockWaitTimeout().errno == 1205
    assert E.ProtocolError("x").errno == 3863


def test_exit_status_table() -> None:
    assert E.exit_status(E.WrongValueForVar("clone_x", 1)) == E.EXIT_USAGE == 2
    assert E.exit_status(E.UsageError("bad")) == 2
    assert E.exit_status(E.DonorError("x")) == 1
    assert E.exit_status(E.DatabaseExists("/x")) == E.EXIT_REFUSED == 3
    assert E.exit_status(RuntimeError()) == 1
    for cls in (E.AccessDenied, E.NoPrivilege, E.SslError, E.InsecureTransport):
        assert E.EXIT_STATUS_TABLE[cls] == E.EXIT_AUTH == 6, cls
    for cls in (E.DatabaseExists, E.PathInDatadir, E.SysConfig, E.NotADataDirectory):
        assert E.EXIT_STATUS_TABLE[cls] == 3, cls
    for cls in (E.TooManyClones, E.CloneInProgress):
        assert E.EXIT_STATUS_TABLE[cls] == E.EXIT_BUSY == 4, cls
    assert E.EXIT_STATUS_TABLE[E.DonorUnreachable] == E.EXIT_UNREACHABLE == 5
    assert E.DonorUnreachable("x").errno == 3862  # MySQL's number, its own status
    assert E.exit_status(E.QueryInterrupted()) == 130
    assert E.exit_status(E.QueryInterrupted(), signal.SIGINT) == 130
    assert E.exit_status(E.QueryInterrupted(), signal.SIGTERM) == 143
    assert E.exit_status(E.InvalidDonorList("Invalid Format")) == 2  # a usage error
    for cls, status in E.EXIT_STATUS_TABLE.items():
        assert status in (1, 2, 3, 4, 5, 6, 130), cls


def test_retryable_is_an_attribute() -> None:
    assert E.NetworkError("x").retryable
    assert not E.DonorError("x").retryable
    assert E.NetworkError("x").errno == E.DonorError.errno


def test_by_number_rebuilds_the_class() -> None:
    err = E.by_number(1007, "Can't create database '/x'; database exists")
    assert isinstance(err, E.DatabaseExists) and err.errno == 1007
    err = E.by_number(3863, "Clone received unexpected response from Donor : x.")
    assert type(err) is E.ProtocolError
    odd = E.by_number(4242, "something")
    assert odd.errno == 4242 and odd.line() == "ERROR 4242 (HY000): something"


def test_outcome_carries_number_and_traceback() -> None:
    try:
        raise E.ChecksumMismatch("block 3")
    except E.CloneError as exc:
        out = E.outcome_of(exc)
    assert out["errno"] == 3863 and "block 3" in out["message"] and "Traceback" in out["traceback"]


def test_the_catch_all_and_unknown_variables() -> None:
    err = E.Unexpected.of(ValueError("bad\nthing"))
    assert err.line() == "ERROR 8000 (HY000): ValueError: bad thing"
    assert err.hint == "rerun with -v for the traceback"
    assert E.Unexpected.of(KeyError()).message == "KeyError"
    assert E.Unexpected.of(RuntimeError("50%"), hint="").line() == (
        "ERROR 8000 (HY000): RuntimeError: 50%")
    assert E.exit_status(E.Unexpected.of(RuntimeError())) == 1
    assert type(E.by_number(8000, "x")) is E.CloneError  # the base class keeps its number
    unknown = E.UnknownVariable("unknown variable 'x' in f")
    assert isinstance(unknown, E.ConfigError) and unknown.errno == 8010
    assert E.exit_status(unknown) == E.EXIT_USAGE
    assert E.EXIT_STATUS_TABLE[E.UnknownVariable] == 2
    assert E.EXIT_STATUS_TABLE[E.Unexpected] == 1


def test_replace_mode_numbers() -> None:
    assert E.RestartFailed("x").line() == "ERROR 3707 (HY000): Restart server failed (x)."
    assert E.ReplaceRefused("/d", "it does not exist").line() == (
        "ERROR 8009 (HY000): Cannot replace '/d': it does not exist")
    assert E.DiskSpace("2.00 MiB", "1.00 MiB").line() == (
        "ERROR 3873 (HY000): Clone estimated database size is 2.00 MiB. Available space "
        "1.00 MiB is not enough.")
    assert E.exit_status(E.RestartFailed("x")) == 1
    assert E.exit_status(E.ReplaceRefused("a", "b")) == E.EXIT_REFUSED == 3


def test_problems_are_reported_each_with_its_hint() -> None:
    many = E.Problems([E.SysConfig("a"), E.Problems([E.DiskSpace("2", "1"),
                                                     E.UsageError("u", hint="do u")])])
    assert [p.errno for p in many.each()] == [3869, 3873, 8001]
    assert many.errno == 3869 and many.line() == E.SysConfig("a").line()
    assert E.exit_status(many) == E.exit_status(E.SysConfig("a")) == 3  # the first one's
    assert E.exit_status(E.Problems([E.UsageError("u"), E.SysConfig("a")])) == 2
    assert many.to_dict()["errors"][2] == {"error_no": 8001, "error_message": "u"}
    assert E.problems_of(lambda: None) == []
    assert [p.errno for p in E.problems_of(E.raise_all, many.each())] == [3869, 3873, 8001]
    with pytest.raises(E.DiskSpace):
        E.raise_all([E.DiskSpace("2", "1")])
    E.raise_all([])
