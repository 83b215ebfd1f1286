"""Durable writes and the name checks the recipient applies to everything the donor says.

Writes are durable by construction, so that a crash leaves the old content or the new,
never a mix: a temporary name in the same directory, fsync, rename, fsync the
directory.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Any

from engine.errors import UnsafeName

# What the recipient accepts from a donor. Linux limits a component to 255 bytes, but
# neither the depth of a tree nor the length of a path within it (PATH_MAX only bounds
# what one system call takes, and the clone walks long paths a piece at a time): these
# sit far beyond real trees and only bound what one manifest entry may cost.
MAX_NAME = 1 << 20  #: bytes in a relative path
MAX_COMPONENT = 255  #: bytes in one path component
MAX_DEPTH = 32768  #: components in a relative path
#: A path up to this many bytes goes to the kernel whole; a longer one is opened a
#: piece at a time (PATH_MAX, 4096 bytes with its NUL, bounds one system call).
PATH_PIECE = 3800
#: Names the donor may not send at the top level: the recipient's own working folders.
RESERVED_TOP = ("#clone", "#ib_archive")
#: Reserved as well in a page store's clone: RECOVERY writes the redo log and the
#: control file there, so nothing the donor sends may stand in its place.
RESERVED_PAGED = (*RESERVED_TOP, "#ib_redo")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (a reader sees the old or the new
    content, whole), and durably unless ``durable`` is False (no fsync: a crash may
    then leave the old content, or an empty file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


_LIBC: Any = None


def libc() -> Any:
    """This process's C library (syncfs, mallopt), loaded at first use: ``dlopen(NULL)``
    finds it without ``ctypes.util.find_library``, which runs ``ldconfig`` in a
    subprocess, a cost every worker would pay at its start."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


#: How a clone's files are opened for writing: never through a link.
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def syncfs(path: str) -> None:
    """Flush the whole file system holding ``path`` (one call instead of one fsync a file)."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def preallocate(fd: int, size: int) -> bool:
    """Allocate the first ``size`` bytes of ``fd`` on disk (unwritten: they read as
    zeros) and set its size, so that later writes neither extend it nor allocate: the
    ``fallocate`` system call itself, never glibc's ``posix_fallocate``, which writes
    zeros where a file system cannot. False where it cannot (tmpfs before 2.6.38, NFS
    before 4.2, some FUSE, not Linux); a full disk raises ENOSPC now rather than mid-copy."""
    import ctypes

    try:
        fallocate = libc().fallocate
    except AttributeError:  # not Linux
        return False
    if fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset+length)`` of ``fd`` back to disk, without
    waiting for it (``sync_file_range``; durable only after a later sync). A no-op
    where the call is missing."""
    import ctypes

    try:
        call = libc().sync_file_range
    except AttributeError:  # not Linux
        return
    call(fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free ``[offset, offset+length)`` of ``fd`` (it reads as zeros, holds no blocks,
    keeps its size). False where the file system cannot (then the caller writes zeros)."""
    import ctypes

    try:
        fallocate = libc().fallocate
    except AttributeError:  # not Linux
        return False
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset),
                 ctypes.c_int64(length)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def _pieces(rel: str) -> list[bytes]:
    """``rel``'s directory part cut into relative paths of at most PATH_PIECE bytes."""
    parts = os.fsencode(rel).split(b"/")[:-1]
    pieces: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for part in parts:
        if current and size + 1 + len(part) > PATH_PIECE:
            pieces.append(b"/".join(current))
            current, size = [], -1
        current.append(part)
        size += 1 + len(part)
    if current:
        pieces.append(b"/".join(current))
    return pieces


def parent_at(dir_fd: int, rel: str, split: bool = False) -> tuple[int, str, bool]:
    """Where the ``*at`` system calls find ``rel`` beneath ``dir_fd``: (a directory
    descriptor, a name relative to it, whether the caller must close the descriptor).

    A short ``rel`` is given whole to the kernel (no system call here) unless ``split``
    asks for its last component alone (the xattr calls, which take no ``dir_fd``, name
    it as ``/proc/self/fd/N/NAME``). A long one is opened a directory piece at a time,
    each piece without following a link at its last component, so that path length and
    depth are limited by the file system only."""
    if "/" not in rel:
        return dir_fd, rel, False
    long = len(rel) * 4 > PATH_PIECE and len(os.fsencode(rel)) > PATH_PIECE
    if not (split or long):
        return dir_fd, rel, False
    pieces = _pieces(rel) if long else [os.fsencode(rel.rpartition("/")[0])]
    fd = dir_fd
    try:
        for piece in pieces:
            nfd = os.open(piece, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd, rel.rpartition("/")[2], True


def open_at(dir_fd: int, rel: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of ``rel`` beneath ``dir_fd``, whatever its length: one system call
    for a path the kernel takes whole (the usual case costs nothing more)."""
    try:
        return os.open(rel, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    dfd, name, owned = parent_at(dir_fd, rel)
    try:
        return os.open(name, flags, mode, dir_fd=dfd)
    finally:
        if owned:
            os.close(dfd)


def mkdir_at(dir_fd: int, rel: str, mode: int) -> None:
    """``os.mkdir`` of ``rel`` beneath ``dir_fd``, whatever its length."""
    try:
        os.mkdir(rel, mode, dir_fd=dir_fd)
        return
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    dfd, name, owned = parent_at(dir_fd, rel)
    try:
        os.mkdir(name, mode, dir_fd=dfd)
    finally:
        if owned:
            os.close(dfd)


def proc_path(dir_fd: int, name: str) -> str:
    """A path naming ``name`` in the directory ``dir_fd``, for the calls without a
    ``dir_fd`` parameter (getxattr, setxattr, listxattr); short whatever the depth."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def check_relpath(name: object, reserved: tuple[str, ...] = RESERVED_TOP) -> str:
    """Return ``name`` if it is a safe relative path inside a destination, else raise.

    Refused: non-strings, empty, absolute, NUL, ``.`` or ``..`` components, empty
    components (``a//b``), trailing slash, over-long names, a ``reserved`` top folder.
    """
    if not isinstance(name, str):
        raise UnsafeName("file name is not a string")
    if not name:
        raise UnsafeName("empty file name")
    if "\x00" in name:
        raise UnsafeName(f"file name with a NUL byte: {name!r}")
    if name.startswith("/"):
        raise UnsafeName(f"absolute file name {name!r}")
    try:
        encoded = os.fsencode(name)
    except UnicodeError:
        raise UnsafeName(f"file name {name!r} cannot be encoded") from None
    if len(encoded) > MAX_NAME:
        raise UnsafeName(f"file name of {len(encoded)} bytes exceeds {MAX_NAME}")
    # One encoding for the whole name: "/" is the byte b"/" and nothing else encodes to
    # it, so the encoded components are the components' encodings (every name of a
    # clone comes through here, so it is encoded once).
    parts = encoded.split(b"/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeName(f"file name {name[:80]!r}... is nested too deep")
    for part in parts:
        if part in (b"", b".", b".."):
            raise UnsafeName(f"file name {name!r} has a '{os.fsdecode(part) or '//'}' component")
        if len(part) > MAX_COMPONENT:
            raise UnsafeName(f"file name component of {len(part)} bytes in {name[:80]!r}")
    top = name.partition("/")[0]
    if top in reserved:
        raise UnsafeName(f"file name {name!r} uses the reserved '{top}' folder")
    return name


#: What a path beneath a root may not pass through: a symbolic link (ELOOP from
#: O_NOFOLLOW) or something that is not a directory where one is needed (ENOTDIR).
ESCAPE_ERRNOS = (errno.ELOOP, errno.ENOTDIR)


def _walk_beneath(root: str, rel: str, make_parents: bool) -> tuple[int, str]:
    """An open descriptor of ``rel``'s parent beneath ``root`` and its last component.

    Each component is opened with O_NOFOLLOW relative to the one before it, so that no
    symbolic link anywhere in the path, planted before or during the walk, can lead out
    of ``root`` (openat2's RESOLVE_BENEATH, which Python does not expose, done by hand).
    ``rel`` must have passed :func:`check_relpath`. The caller closes the descriptor."""
    parts = rel.split("/")
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            if make_parents:
                try:
                    os.mkdir(part, 0o750, dir_fd=dfd)
                except FileExistsError:
                    pass
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
    except BaseException:
        os.close(dfd)
        raise
    return dfd, parts[-1]


def open_beneath(root: str, rel: str, flags: int, mode: int = 0o640,
                 make_parents: bool = False) -> int:
    """``os.open`` of ``root/rel`` that never follows a link at any component.

    Raises OSError with an errno of :data:`ESCAPE_ERRNOS` where the path goes through
    a link or a non-directory; ``make_parents`` creates missing directories (0750)."""
    dfd, last = _walk_beneath(root, rel, make_parents)
    try:
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    finally:
        os.close(dfd)


def unlink_beneath(root: str, rel: str) -> None:
    """``os.unlink`` of ``root/rel`` without following a link at any component (a link
    as the last component is itself removed, never its target)."""
    dfd, last = _walk_beneath(root, rel, make_parents=False)
    try:
        os.unlink(last, dir_fd=dfd)
    finally:
        os.close(dfd)


def remove_tree(path: str) -> None:
    """Remove a tree we created, without following symbolic links out of it."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            os.chmod(entry.path, 0o700)
            remove_tree(entry.path)
        else:
            os.unlink(entry.path)
    os.rmdir(path)


def ensure_modes(paths: Iterable[str], mode: int) -> None:
    for path in paths:
        os.chmod(path, mode)
