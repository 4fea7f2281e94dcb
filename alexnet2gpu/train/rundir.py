"""A run directory belongs to one run: claimed with a lock for as long as a process trains into it.

RUN_DIR/last.pt      the checkpoint (alexnet2gpu.train.checkpoint)
RUN_DIR/train.csv    RUN_DIR/val.csv    RUN_DIR/tb/    the logs (alexnet2gpu.train.logs)
RUN_DIR/.lock        the claim: an flock held by the training process, with its PID and host

A fresh run refuses a directory that holds a checkpoint (forgetting `--resume` after a crash would
otherwise overwrite the run); `overwrite=True` (`--overwrite`) removes the old run's files first.
The lock is an flock, which the kernel releases on every exit, a crash and SIGKILL included: a
lock file left behind by a dead process is stale by construction and is simply taken over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from alexnet2gpu import files

RUN_FILES = ("last.pt", "train.csv", "val.csv", "events.log")
RUN_DIRS = ("tb",)


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
            for stale in self.path.glob(f".*{files.TEMPORARY}"):  # a save cut by SIGKILL or a power cut
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
            (self.path / files.LOCK).unlink(missing_ok=True)
        self._unlock()
        for folder in self.created if wrote_nothing else []:
            try:
                folder.rmdir()  # only while empty: nothing another process put there is removed
            except OSError:
                break

    def _holds_only_the_lock(self) -> bool:
        try:
            return [p.name for p in self.path.iterdir()] == [files.LOCK]
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
        """Refuse to start a new run over a saved one; with `overwrite`, remove the old run first."""
        last = self.path / "last.pt"
        if last.exists() and not last.is_file():
            raise RunDirError(f"{last} is not a file: move it out of the run directory, or choose another --out")
        if self.resume is not None and last.exists() and Path(self.resume).resolve() == last.resolve():
            return
        if last.exists() and not self.overwrite:
            raise RunDirError(
                f"{self.path} holds a run (last.pt): continue it with --resume {last}, "
                "or start over there with --overwrite (its checkpoint and logs are deleted)"
            )
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)  # logs of a run that never saved are not kept either
        for name in RUN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)
