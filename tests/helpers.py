"""Helpers for integration tests: run the real CLI, start a real donor, build and compare trees."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "clone_agent.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, timeout: float = 120, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, input=input, env={**os.environ, **(env or {})})


class Donor:
    """``clone-agent serve`` in a subprocess; waits for its ``ready`` line (bounded)."""

    def __init__(self, datadir: Path | str, *extra: str, timeout: float = 60,
                 prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: a command the donor runs under (e.g. setpriv, as another user)."""
        self.prefix = prefix
        self.port = free_port()
        self.datadir = str(datadir)
        self.extra = extra
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Donor:
        self.proc = subprocess.Popen(
            [*self.prefix, *CLI, "serve", self.datadir, "--bind", self.address,
             *([] if "--users" in self.extra else ["--allow-anonymous"]), *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout
        line = ""
        while time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                line = self.proc.stdout.readline()
                break
        sel.close()
        if line.strip() != f"ready {self.address}":
            self.stop()
            raise RuntimeError(f"donor not ready: {line!r} {self.stderr}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, self.stderr = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate(timeout=5)
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_tree(root: Path, big: int = 3 << 20) -> None:
    """Every case the copy must keep: sizes, modes, times, names, holes, links, empties."""
    root.mkdir()
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty dir").mkdir()
    (root / "with space").mkdir()
    (root / "big.bin").write_bytes(os.urandom(big))
    (root / "exactly_1MiB").write_bytes(os.urandom(1 << 20))
    (root / "with space" / "ñämé €.txt").write_text("non-ascii\n")
    (root / "日本語").write_bytes(b"\x00\x01" * 5000)
    # names that are not UTF-8 (Latin-1 bytes): they travel as "pb", and as str with
    # surrogate escapes between the processes of each side
    (root / os.fsdecode(b"caf\xe9")).mkdir()
    (root / os.fsdecode(b"caf\xe9") / os.fsdecode(b"\xff.ibd")).write_bytes(os.urandom(3000))
    for i in range(400):
        (root / "sub" / f"small{i:03}").write_bytes(os.urandom(i * 13))
    (root / "sub" / "deep" / "zero").write_bytes(b"")
    with open(root / "sparse", "wb") as f:
        f.truncate(16 << 20)
        f.seek(5 << 20)
        f.write(b"data in the middle")
        f.seek((16 << 20) - 3)
        f.write(b"end")
    with open(root / "sparse_tail", "wb") as f:
        f.write(b"head")
        f.truncate(8 << 20)
    os.chmod(root / "big.bin", 0o640)
    os.chmod(root / "sub" / "small001", 0o600)
    os.chmod(root / "sub" / "small002", 0o755)
    os.chmod(root / "sub" / "deep", 0o711)
    os.symlink("big.bin", root / "link")
    os.utime(root / "big.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(root / "sub", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))


def describe(root: Path) -> dict[str, Any]:
    """Everything a faithful copy must keep, by relative path (the top folder excluded)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != "#clone"]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            entry: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode),
                                     "type": stat.S_IFMT(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["mtime_ns"] = st.st_mtime_ns
                with open(path, "rb") as f:
                    entry["bytes"] = f.read()
            else:
                entry["mtime_ns"] = st.st_mtime_ns
            out[rel] = entry
    return out


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def describe_faithful(root: Path) -> dict[str, Any]:
    """Everything cp -a and rsync -aHAX keep, by relative path ("." the top, its
    #clone/ left out): type, bits, owner, group, size, a digest of the bytes, mtime,
    atime (not a symbolic link's: reading it moves it), a device's number, a link's
    target, every extended attribute (ACLs included), and for an inode of several
    names the first of them. Walks with directory descriptors (any depth or path
    length) and reads with O_NOATIME, so that describing a tree does not change it."""
    import hashlib

    out: dict[str, Any] = {}
    first: dict[tuple[int, int], str] = {}

    def entry(rel: str, st: os.stat_result, dfd: int, name: str | None) -> None:
        where: Any = dfd if name is None else f"/proc/self/fd/{dfd}/{name}"
        kind = stat.S_IFMT(st.st_mode)
        item: dict[str, Any] = {"type": kind, "mode": stat.S_IMODE(st.st_mode),
                                "uid": st.st_uid, "gid": st.st_gid,
                                "mtime_ns": st.st_mtime_ns}
        if kind != stat.S_IFLNK:
            item["atime_ns"] = st.st_atime_ns
        if kind != stat.S_IFDIR and st.st_nlink > 1:
            item["inode"] = first.setdefault((st.st_dev, st.st_ino), rel)
        if kind == stat.S_IFREG:
            assert name is not None
            fd = os.open(name, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                item["sha"] = hashlib.sha256(f.read()).hexdigest()
            item["size"] = st.st_size
        elif kind == stat.S_IFLNK:
            item["target"] = os.readlink(name or ".", dir_fd=dfd)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            item["rdev"] = st.st_rdev
        kw: dict[str, Any] = {} if name is None else {"follow_symlinks": False}
        item["xattrs"] = {k: os.getxattr(where, k, **kw)
                          for k in sorted(os.listxattr(where, **kw))}
        out[rel] = item

    def walk(dfd: int, rel_dir: str) -> None:
        with os.scandir(dfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if not rel_dir and name == "#clone":
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            entry(rel, st, dfd, name)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                              os.O_NOATIME, dir_fd=dfd)
                try:
                    walk(sub, rel)
                finally:
                    os.close(sub)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        entry(".", os.fstat(top), top, None)
        walk(top, "")
    finally:
        os.close(top)
    return out


def plain_peer(ctx: Any, address: str) -> Any:
    """A DEALER stream to a donor, its handshake done, plain (as --require-no-ssl): for
    tests that drive the donor with raw commands (INIT, EXIT) at an anonymous donor."""
    import zmq

    from engine import protocol as P

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    sock.send_multipart(P.command(P.HELLO, {"version": P.PROTOCOL_VERSION, "e": ""}))
    assert sock.poll(10000), "the donor did not answer HELLO"
    assert P.decode(sock.recv_multipart(), P.RESP).kind == P.HELLO_REPLY
    return sock


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``8m``) mounted at ``path``, made here, for the block: a disk
    that fills up (root only: the test skips elsewhere)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
