"""Writing files so that a crash, a signal or a second process never leaves one torn.

`atomic_write` is the one way the package replaces a file (checkpoints, logs, statistics, staged
shards, cached features, figures): write a temporary file beside it, sync it, rename it over the
target, sync the folder. `claim` is the one way a process holds a folder (a run, a staging): an
flock on a lock file that names the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMPORARY = ".tmp"  # the suffix of every temporary file: what a SIGKILL left is found by it
LOCK = ".lock"  # the lock file of a claimed folder


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call: two writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY}")


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
    included) the temporary file is removed and the exception goes on."""
    path = Path(path)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's mode, as open() gives
    try:
        yield tmp
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Busy(Exception):
    """The folder is claimed by another process; `holder` says which ("process PID on HOST")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def claim(folder: Path) -> IO[str]:
    """Hold `folder` for this process: an flock on FOLDER/.lock, which the kernel releases on any
    exit (SIGKILL included), with this process named in it. Raises Busy if another holds it, and
    OSError if the lock file cannot be opened. Give it back with `release`."""
    file = open(folder / LOCK, "a+")  # noqa: SIM115 - held open while the folder is claimed
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
