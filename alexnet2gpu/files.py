"""Writing files so that a crash, a signal or a second process never leaves one torn.

`atomic_write` is the one way the package replaces a file (checkpoints, logs, statistics, staged
shards, cached features, figures): write a temporary file beside it, sync it, rename it over the
target, sync the folder. `claim` is the one way a process holds a folder (a run, a staging): an
flock on a lock file that names the holder. `open_regular` and `open_append` are the ways it opens a
file the user named or put in a folder: regular files only, so a FIFO never hangs a read, a device is
never read or written, and an append never follows a link out of the run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

TEMPORARY = ".tmp"  # the suffix of every temporary file: what a SIGKILL left is found by it
LOCK = ".lock"  # the lock file of a claimed folder


class NotRegularFile(OSError):
    """`path` is a FIFO, a device, a socket or a folder where a regular file belongs (or is larger than
    its format allows); `strerror` says which, for the one-line errors that print it."""

    def __init__(self, path: str | Path, what: str) -> None:
        super().__init__(errno.EINVAL, what, str(path))

    def __str__(self) -> str:
        return f"{self.filename} {self.strerror}"


def what_is(mode: int) -> str:
    """What a file of st_mode `mode` is, in words, for a message."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _checked(fd: int, path: str | Path, limit: int | None) -> int:
    """`fd`, once it is known to be a regular file of at most `limit` bytes (closed otherwise)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, f"is {what_is(info.st_mode)}, not a regular file")
        if limit is not None and info.st_size > limit:
            raise NotRegularFile(path, f"holds {info.st_size:,} bytes, more than the {limit:,} its format allows")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | Path, limit: int | None = None) -> BinaryIO:
    """`path` opened for reading, if it is a regular file (a link to one is fine) of at most `limit`
    bytes; otherwise NotRegularFile. Opened without blocking, so a FIFO is refused rather than waited on."""
    return os.fdopen(_checked(os.open(path, os.O_RDONLY | os.O_NONBLOCK), path, limit), "rb")


def read_regular(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (`open_regular`); a file that grows past `limit` while read is refused too."""
    with open_regular(path, limit) as file:
        data = file.read() if limit is None else file.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise NotRegularFile(path, f"holds more than the {limit:,} bytes its format allows")
    return data


def open_append(path: str | Path) -> IO[str]:
    """`path` opened to append text, created if missing; a symbolic link, a FIFO or a device there is
    refused (NotRegularFile), so a log never writes outside its folder or into a special file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotRegularFile(path, "is a symbolic link; a log is written only in its own folder") from None
        raise
    return os.fdopen(_checked(fd, path, None), "a", newline="")


def check_replaceable(path: str | Path) -> None:
    """Refuse to replace what is not a file: a device, a FIFO, a socket or a folder at `path`. A regular
    file, or a link (replaced by the rename, its target untouched), may be replaced."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise NotRegularFile(path, f"is {what_is(mode)}; only a regular file is ever replaced")


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call: two writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY}")


def leftovers(folder: Path) -> list[Path]:
    """The temporary files `atomic_write` left in `folder` (a write cut by SIGKILL or a power cut): only
    names of its own form (.NAME.PID.HEX.tmp), so a user's own `.notes.tmp` is never among them."""
    own = re.compile(rf"^\..+\.\d+\.[0-9a-f]{{8}}{re.escape(TEMPORARY)}$")
    return [path for path in folder.glob(f".*{TEMPORARY}") if own.match(path.name)]


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on a clean exit it is synced and renamed over
    `path`, so `path` is always the old file or the new one, whole. On any exception (KeyboardInterrupt
    included) the temporary file is removed and the exception goes on. A device, FIFO, socket or folder
    at `path` is refused (NotRegularFile) before anything is written."""
    path = Path(path)
    check_replaceable(path)
    tmp = temporary_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's mode, as open() gives
    except OSError as error:  # a read-only, immutable or full folder: said before anything is computed into it
        raise CannotWrite(path, error) from None
    try:
        yield tmp
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class CannotWrite(OSError):
    """No file can be made beside `path` (its folder is read-only, immutable, full, or not ours); the
    message is the one line a command prints."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error), str(path))

    def __str__(self) -> str:
        folder = shown(Path(self.filename).parent)
        return f"cannot write {shown(self.filename)}: {self.strerror}; make {folder} writable (or free space there)"


class Busy(Exception):
    """The folder is claimed by another process; `holder` says which ("process PID on HOST")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def claim(folder: Path) -> IO[str]:
    """Hold `folder` for this process: an flock on FOLDER/.lock, which the kernel releases on any
    exit (SIGKILL included), with this process named in it. Raises Busy if another holds it, and
    OSError if the lock file cannot be opened. Give it back with `release`."""
    lock = folder / LOCK
    try:  # never through a link, never a FIFO (whose open would wait)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotRegularFile(lock, "is a symbolic link; remove it") from None
        raise
    file = os.fdopen(_checked(fd, lock, None), "r+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise Busy(holder) from None
    file.seek(0)
    file.truncate()
    file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    return file


def release(file: IO[str]) -> None:
    """Give a claim back: the holder's line is cleared and the flock goes with the file."""
    file.truncate(0)
    file.close()


@contextlib.contextmanager
def holding(folder: Path) -> Iterator[None]:
    """Hold `folder` (made if missing) for the block: `claim`, then on the way out the lock file is removed
    while still held (a process starting meanwhile makes its own), and so is every folder the claim made
    that holds nothing else: a refused or failed start leaves nothing in the user's folders. Raises Busy
    or OSError as `claim` does."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = claim(folder)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        (folder / LOCK).unlink(missing_ok=True)
        release(lock)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for made in created:  # innermost first; only while empty: nothing another process put there goes
        try:
            made.rmdir()
        except OSError:
            break


def shown(path: str | os.PathLike) -> str:
    """A path as it may be printed: bytes that are not UTF-8 (a Latin-1 name) as backslash escapes, and
    control characters (a newline in a name would forge output lines) escaped, never raising."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)
