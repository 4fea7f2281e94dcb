"""A run directory belongs to one run: claimed with a lock for as long as a process trains into it.

RUN_DIR/last.pt      the checkpoint (alexnet2gpu.train.checkpoint)
RUN_DIR/train.csv    RUN_DIR/val.csv    RUN_DIR/lr.csv    RUN_DIR/tb/    the logs (alexnet2gpu.train.logs)
RUN_DIR/.lock        the claim: an flock held by the training process, with its PID and host
RUN_DIR/.run         the mark of a run folder: written when a run starts, before any log

A fresh run refuses a directory that holds a checkpoint (forgetting `--resume` after a crash would
otherwise overwrite the run); `overwrite=True` (`--overwrite`) removes the old run's files first.
Without `overwrite`, logs are deleted only where the mark says a run of ours wrote them (an attempt
that never saved); logs in an unmarked folder are someone else's, and the run refuses the folder.
Resuming from a checkpoint inside the folder (last.pt, or a renamed copy) keeps its logs: the loop
drops their rows after the checkpoint's step.
The lock is an flock, which the kernel releases on every exit, a crash and SIGKILL included: a
lock file left behind by a dead process is stale by construction and is simply taken over.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from alexnet2gpu import files

RUN_FILES = ("last.pt", "train.csv", "val.csv", "lr.csv", "events.log")
RUN_DIRS = ("tb",)
MARK = ".run"  # what says a folder's logs were written by a run of ours


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class RunDir:
    """Claim `path` for a run: `with RunDir(path, resume=..., overwrite=...)`."""

    def __init__(self, path: str | Path, *, resume: str | Path | None = None, overwrite: bool = False) -> None:
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        self.lock_file = None
        self.created: list[Path] = []  # folders this claim made, innermost first: removed if the run wrote nothing

    def __enter__(self) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file; name a directory for the run (it is created if missing)")
        try:
            self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(
                f"cannot create run directory {self.path}: {error.strerror}; choose another --out"
            ) from None
        self._lock()
        try:
            for stale in files.leftovers(self.path):  # a save cut by SIGKILL or a power cut
                stale.unlink(missing_ok=True)
            self._check_fresh()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        # A start that failed (a missing or refused checkpoint, no data) leaves no empty run behind. The
        # lock file goes while still held, so a process starting meanwhile makes its own and keeps it.
        wrote_nothing = bool(self.created) and self.lock_file is not None and self._holds_only_the_lock()
        if wrote_nothing:
            (self.path / MARK).unlink(missing_ok=True)
            (self.path / files.LOCK).unlink(missing_ok=True)
        self._unlock()
        for folder in self.created if wrote_nothing else []:
            try:
                folder.rmdir()  # only while empty: nothing another process put there is removed
            except OSError:
                break

    def _holds_only_the_lock(self) -> bool:
        try:
            return {p.name for p in self.path.iterdir()} <= {files.LOCK, MARK}
        except OSError:  # the folder went away during the run: nothing to tidy, and no error to add
            return False

    def _lock(self) -> None:
        try:
            self.lock_file = files.claim(self.path)
        except OSError as error:
            raise RunDirError(
                f"cannot write in run directory {self.path}: {error.strerror}; choose another --out"
            ) from None
        except files.Busy as busy:
            raise RunDirError(
                f"run directory {self.path} is in use by {busy.holder}; wait for it to end or choose another --out"
            ) from None

    def _unlock(self) -> None:
        if self.lock_file is not None:
            files.release(self.lock_file)
            self.lock_file = None

    def _check_fresh(self) -> None:
        """Refuse to start a new run over a saved one, or over logs a run of ours did not write; with
        `overwrite`, remove the old run's files first. Marks the folder as a run's before any log."""
        for name in RUN_FILES:  # a link or a special file among the run's own names: never written through
            where = self.path / name
            mode = os.lstat(where).st_mode if os.path.lexists(where) else stat.S_IFREG
            if not stat.S_ISREG(mode) and not (name == "last.pt" and stat.S_ISLNK(mode) and where.is_file()):
                raise RunDirError(
                    f"{where} is {files.what_is(mode)}, where the run writes its {name}: "
                    "move it out of the run directory, or choose another --out"
                )
        last = self.path / "last.pt"
        resume = Path(self.resume).resolve() if self.resume is not None else None
        if resume is not None and last.exists() and resume == last.resolve():
            return self._mark()
        if resume is not None and not last.exists() and resume.parent == self.path.resolve():
            return self._mark()  # a renamed checkpoint of this folder's run: its logs go on (cut after its step)
        if last.exists() and not self.overwrite:
            raise RunDirError(
                f"{self.path} holds a run (last.pt): continue it with --resume {last}, "
                "or start over there with --overwrite (its checkpoint and logs are deleted)"
            )
        present = [name for name in (*RUN_FILES, *RUN_DIRS) if os.path.lexists(self.path / name)]
        if present and not self.overwrite and not (self.path / MARK).is_file():
            listed = ", ".join(f"{name}/" if name in RUN_DIRS else name for name in present)
            raise RunDirError(
                f"{self.path} holds {listed}, not written by a run of alexnet2gpu: move them out, choose "
                "another --out, or pass --overwrite to delete them"
            )
        for name in present:  # an earlier attempt of a run that never saved, or --overwrite
            where = self.path / name
            if where.is_dir() and not where.is_symlink():
                shutil.rmtree(where, ignore_errors=True)
            else:
                where.unlink(missing_ok=True)  # a link is removed, never what it points to
        self._mark()

    def _mark(self) -> None:
        """(Re)write the mark as every save writes: a temporary file renamed into place. A folder the
        run cannot save in (read-only, immutable, full) is then said now, not after an epoch's steps."""
        try:
            with files.atomic_write(self.path / MARK) as tmp:
                tmp.write_text("a run of alexnet2gpu: its logs are replaced when a fresh run starts here\n")
        except files.NotRegularFile:
            raise  # a FIFO or a folder named .run: its own one line
        except OSError as error:
            raise RunDirError(
                f"cannot save in run directory {self.path}: {error.strerror or error}; "
                "free space or make it writable, or choose another --out"
            ) from None
