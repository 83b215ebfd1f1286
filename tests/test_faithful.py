"""Any tree, faithfully: a crafted tree with every case, cloned by pull and by
clone-local as root (no difference may be found) and into a directory of an
unprivileged user (only the expected differences, each reported)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import acl
from tests.helpers import CLI, ROOT, Donor, describe_faithful, run_cli

NOBODY = 65534
#: The recipient as nobody. It keeps one capability, DAC_READ_SEARCH (to search and
#: read any directory), because the interpreter may live where nobody cannot reach it
#: (under /root with pyenv): its writers must be able to start. It has none of those
#: that decide a faithful copy (CHOWN, FOWNER, FSETID, MKNOD, SETFCAP, SYS_ADMIN), so
#: what it may set is a plain user's.
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")
#: a capability set (cap_net_bind_service+ep), as setcap writes it: version 2 bytes
CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")
LONG = "l" * 255

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="owners and devices need root")


def make_every_case(root: Path) -> None:
    """Every case a faithful copy must keep (the tests' top directory: mode 0751)."""
    root.mkdir()
    (root / "links" / "other").mkdir(parents=True)
    for name in ("one", "two"):  # a group of three names, and one of two
        (root / "links" / name).write_bytes(name.encode() * 1000)
    os.link(root / "links" / "one", root / "links" / "other" / "one-again")
    os.link(root / "links" / "one", root / "links" / "one-thrice")
    os.link(root / "links" / "two", root / "links" / "other" / "two-again")
    owned = root / "owned"
    owned.mkdir()
    for name, uid, gid, mode in (("numbers", 1234, 5678, 0o640),
                                 ("nobody", NOBODY, NOBODY, 0o644),
                                 ("setuid", 1234, NOBODY, 0o4755),
                                 ("setgid", NOBODY, 5678, 0o2755),
                                 ("setuid-nobody", NOBODY, NOBODY, 0o4750)):
        (owned / name).write_bytes(name.encode())
        os.chown(owned / name, uid, gid)
        os.chmod(owned / name, mode)  # after chown, which clears setuid bits
    (owned / "sticky").mkdir()
    os.chmod(owned / "sticky", 0o1777)
    (owned / "setgid-dir").mkdir()
    os.chown(owned / "setgid-dir", 0, 5678)
    os.chmod(owned / "setgid-dir", 0o2775)
    attrs = root / "attrs"
    attrs.mkdir()
    (attrs / "xattrs").write_bytes(b"x")
    os.setxattr(attrs / "xattrs", "user.comment", b"kept")
    os.setxattr(attrs / "xattrs", "user.binary", bytes(range(256)))
    os.setxattr(attrs / "xattrs", "trusted.origin", b"donor")
    (attrs / "capable").write_bytes(b"#!/bin/true\n")
    os.chmod(attrs / "capable", 0o755)
    os.setxattr(attrs / "capable", "security.capability", CAPABILITY)
    os.setxattr(attrs, "user.on-a-directory", b"yes")
    (attrs / "acl").write_bytes(b"acl")
    os.setxattr(attrs / "acl", acl.ACCESS, acl.pack([
        (acl.USER_OBJ, 6, acl.UNDEFINED_ID), (acl.USER, 4, 1234),
        (acl.GROUP_OBJ, 4, acl.UNDEFINED_ID), (acl.GROUP, 6, 5678),
        (acl.MASK, 6, acl.UNDEFINED_ID), (acl.OTHER, 0, acl.UNDEFINED_ID)]))
    (attrs / "inherits").mkdir()
    os.setxattr(attrs / "inherits", acl.DEFAULT, acl.pack([
        (acl.USER_OBJ, 7, acl.UNDEFINED_ID), (acl.USER, 7, 1234),
        (acl.GROUP_OBJ, 5, acl.UNDEFINED_ID), (acl.MASK, 7, acl.UNDEFINED_ID),
        (acl.OTHER, 5, acl.UNDEFINED_ID)]))
    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "fifo", 0o620)
    os.mknod(special / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(special / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mknod(special / "socket", stat.S_IFSOCK | 0o755)
    os.symlink("fifo", special / "link-to-fifo")
    names = root / "names"
    names.mkdir()
    (names / LONG).write_bytes(b"a 255-byte name")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rel = "long"
        os.mkdir(rel, dir_fd=fd)
        for _ in range(17):  # 17 x 256 bytes: a path over 4096 bytes
            rel += "/" + LONG
            os.mkdir(_short(fd, rel), dir_fd=_parent(fd, rel))
        _write_deep(fd, rel + "/end", b"beyond PATH_MAX")
        rel = "deep"
        os.mkdir(rel, dir_fd=fd)
        for _ in range(300):
            rel += "/d"
            os.mkdir(_short(fd, rel), dir_fd=_parent(fd, rel))
        _write_deep(fd, rel + "/bottom", b"300 levels down")
    finally:
        os.close(fd)
    times = root / "times"
    times.mkdir()
    for name, ns in (("2200", 7_258_118_400_123_456_789), ("1960", -315_619_200_000_000_001)):
        (times / name).write_bytes(name.encode())
        os.utime(times / name, ns=(ns - 5, ns))
    with open(root / "sparse", "wb") as f:
        f.truncate(12 << 20)
        f.seek(4 << 20)
        f.write(b"island")
    (root / "#clone").mkdir()  # a name the clone reserves: reported, not copied
    (root / "#clone" / "theirs").write_bytes(b"x")
    os.chmod(root, 0o751)
    os.utime(root, ns=(1_500_000_000_000_000_001, 1_600_000_000_000_000_002))


def _parent(top: int, rel: str) -> int:
    """The parent of a path of any length, opened a piece at a time (the test's own
    walk, independent of the code under test); the caller never closes ``top``."""
    fd = top
    parts = rel.split("/")[:-1]
    for i in range(0, len(parts), 10):
        nfd = os.open("/".join(parts[i:i + 10]), os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if fd != top:
            os.close(fd)
        fd = nfd
    return fd


def _short(top: int, rel: str) -> str:
    return rel.rpartition("/")[2]


def _write_deep(top: int, rel: str, data: bytes) -> None:
    dfd = _parent(top, rel)
    fd = os.open(_short(top, rel), os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
    os.write(fd, data)
    os.close(fd)
    os.close(dfd)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the crafted tree has owners and devices: needs root")
    root = tmp_path_factory.mktemp("faithful") / "src"
    make_every_case(root)
    return root


def _warnings(dest: Path) -> list[dict[str, str]]:
    status = json.loads(run_cli("status", str(dest), "--json").stdout)["clone_status"]
    assert status["state"] == "Completed"
    assert status["warning_count"] == len(status["warnings"])
    return list(status["warnings"])


def _reserved_only(dest: Path, stderr: str) -> None:
    """The one warning of a root clone: the source's own #clone/ is not copied."""
    warnings = _warnings(dest)
    assert [(w["kind"], w["path"]) for w in warnings] == [("reserved", "#clone")], warnings
    assert "warning: #clone: '#clone' is not copied" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("clone Completed with 1 warnings")


@root_only
def test_pull_as_root_keeps_every_case(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "clone"
    expected = describe_faithful(tree)
    with Donor(tree) as donor:
        res = run_cli("pull", f"root@{donor.address}", "--data-dir", str(dest))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in donor.stderr
    got = describe_faithful(dest)
    assert {k for k in got if got[k] != expected.get(k)} == set()
    assert got == expected
    _reserved_only(dest, res.stderr)
    assert not (dest / "#clone" / "theirs").exists()


@root_only
def test_clone_local_as_root_keeps_every_case(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "local"
    expected = describe_faithful(tree)
    res = run_cli("clone-local", str(tree), "--data-dir", str(dest), "--json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    expected_warning = {"event": "warning", "kind": "reserved", "path": "#clone",
                        "message": "'#clone' is not copied: the clone reserves this name "
                                   "at the top of its destination"}
    assert any(expected_warning.items() <= e.items() for e in events), events
    assert events[-1]["clone_status"]["warning_count"] == 1
    assert describe_faithful(dest) == expected


@root_only
def test_numeric_ids_and_without_xattrs_or_acls(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "bare"
    expected = describe_faithful(tree)
    res = run_cli("clone-local", str(tree), "--data-dir", str(dest), "--numeric-ids",
                  "--no-xattrs", "--no-acls")
    assert res.returncode == 0, res.stderr
    got = describe_faithful(dest)
    for rel, item in expected.items():
        want = dict(item, xattrs={})
        if acl.ACCESS in item["xattrs"]:  # without its ACL: the owning group's bits
            want["mode"] = item["mode"] & ~0o070 | 0o040
        assert got[rel] == want, rel


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory every user can reach (a test's tmp_path is root's alone), removed
    at the end."""
    path = Path(tempfile.mkdtemp(prefix="clone-agent-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, *CLI, *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT,
                          env={**os.environ, "CLONE_AGENT_STATE_DIR": str(state)})


def _unprivileged(item: dict[str, Any]) -> dict[str, Any] | None:
    """What a recipient running as nobody makes of a donor's entry (None: nothing)."""
    if item["type"] in (stat.S_IFCHR, stat.S_IFBLK):
        return None  # devices need root: reported
    out = dict(item, uid=NOBODY, gid=NOBODY)
    if item["uid"] != NOBODY:
        out["mode"] &= ~stat.S_ISUID
    if item["gid"] != NOBODY:
        out["mode"] &= ~stat.S_ISGID
    out["xattrs"] = {k: v for k, v in item["xattrs"].items()
                     if not k.startswith(("trusted.", "security."))}
    return out


@root_only
def test_pull_as_another_user_reports_what_it_cannot_keep(tree: Path, world: Path) -> None:
    home = world / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    dest = home / "clone"
    expected = {rel: _unprivileged(item) for rel, item in describe_faithful(tree).items()}
    with Donor(tree) as donor:
        res = _as_nobody("pull", f"u@{donor.address}", "--data-dir", str(dest),
                         state=home / "state")
    assert res.returncode == 0, res.stderr
    got = describe_faithful(dest)
    assert got == {rel: item for rel, item in expected.items() if item is not None}
    status = json.loads(_as_nobody("status", str(dest), "--json", state=home / "state"
                                   ).stdout)["clone_status"]
    found = {(w["kind"], w["path"]) for w in status["warnings"]}
    assert {("mode", "owned/setuid"), ("mode", "owned/setgid"),
            ("mode", "owned/setgid-dir"), ("special", "special/null"),
            ("special", "special/loop"), ("reserved", "#clone")} <= found, found
    kinds = {w["kind"] for w in status["warnings"]}
    assert {"owner", "xattr"} <= kinds
    assert ("mode", "owned/setuid-nobody") not in found  # its owner was kept
    messages = " ".join(w["message"] for w in status["warnings"])
    assert "trusted.* extended attributes not set" in messages
    assert "security.* extended attributes not set" in messages
    assert "devices need root" in messages
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"clone Completed with {status['warning_count']} warnings")
