import signal

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
