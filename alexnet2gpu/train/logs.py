"""What a run leaves for people to read: CSV files and TensorBoard events in the run directory.

RUN_DIR/train.csv   step, epoch, lr, loss, top1_err, img_per_s   (every log_every steps)
RUN_DIR/val.csv     epoch, step, lr, train_loss, loss, top1_err, top5_err
RUN_DIR/lr.csv      epoch, step, then the lr of each parameter group as the epoch starts ("lr_weights",
                    "lr_biases"; under the 2012 schedule every layer's: "lr_conv1.weight", ...)
RUN_DIR/events.log  step<TAB>message: warnings of the run (the stuck-loss alarm)
RUN_DIR/tb/         the same, for `tensorboard --logdir RUN_DIR`
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from alexnet2gpu.files import atomic_write, open_append, read_regular

TRAIN_FIELDS = ("step", "epoch", "lr", "loss", "top1_err", "img_per_s")
VAL_FIELDS = ("epoch", "step", "lr", "train_loss", "loss", "top1_err", "top5_err")


class RunLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        """`purge_step`: TensorBoard hides the events of this step and later (a resumed run's)."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)
            except Exception as error:  # noqa: BLE001 - a side job: the run goes on without it
                self._lose_tensorboard(error)

    def _lose_tensorboard(self, error: BaseException) -> None:
        """TensorBoard is a side job: when its events cannot be written, say so once and go on without it
        (the CSV logs and the checkpoint hold everything it would show)."""
        self.writer = None
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        print(
            f"warning: TensorBoard events in {self.dir / 'tb'} cannot be written ({reason}); the run goes on "
            "without them (train.csv and val.csv have the same numbers)",
            file=sys.stderr,
        )

    def _tensorboard(self, write) -> None:
        if self.writer is None:
            return
        try:
            write(self.writer)
        except Exception as error:  # noqa: BLE001 - its writer thread's errors surface at the next call
            self._lose_tensorboard(error)

    def _append(self, name: str, fields: tuple[str, ...], row: dict) -> None:
        path = self.dir / name
        new = not path.exists()
        with open_append(path) as f:  # never through a link, never into a FIFO
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row[k] for k in fields})

    def train(self, **row) -> None:
        self._append("train.csv", TRAIN_FIELDS, row)

        def write(writer) -> None:
            for key in ("loss", "top1_err", "lr", "img_per_s"):
                writer.add_scalar(f"train/{key}", row[key], row["step"])

        self._tensorboard(write)

    def val(self, **row) -> None:
        self._append("val.csv", VAL_FIELDS, row)

        def write(writer) -> None:
            for key in ("loss", "top1_err", "top5_err"):
                writer.add_scalar(f"val/{key}", row[key], row["step"])
            writer.flush()

        self._tensorboard(write)

    def lrs(self, epoch: int, step: int, groups: list[dict]) -> None:
        """The learning rate of every parameter group as epoch `epoch` starts (at `step`)."""
        row = {"epoch": epoch, "step": step, **{f"lr_{g.get('name', k)}": g["lr"] for k, g in enumerate(groups)}}
        self._append("lr.csv", tuple(row), row)

    def note(self, step: int, message: str) -> None:
        """A line for people to read later: RUN_DIR/events.log and TensorBoard's text tab."""
        with open_append(self.dir / "events.log") as f:
            f.write(f"{step}\t{message}\n")
        self._tensorboard(lambda writer: writer.add_text("events", message, step))

    def truncate_after(self, step: int) -> None:
        """On resume, forget rows written after the checkpoint's step (they will be redone).

        Each log is rewritten atomically (`rewrite`): a crash or SIGKILL during the resume leaves the
        old file whole. A last line cut off by a crash mid-write is dropped, saying so once."""
        for name in ("train.csv", "val.csv", "lr.csv", "events.log"):
            path = self.dir / name
            if not path.exists():
                continue
            lines, torn = _read_lines(path)
            if not lines:  # empty, or a header cut mid-write: no row to keep; the next row writes a header
                path.unlink()
                continue
            kept = _csv_up_to(path, lines, step) if path.suffix == ".csv" else _events_up_to(path, lines, step)
            if torn or kept != lines:
                rewrite(path, kept)

    def close(self) -> None:
        self._tensorboard(lambda writer: writer.close())


def read_csv(path: str | Path) -> list[dict[str, float]]:
    """A CSV log's rows as numbers; a last line cut off by a crash mid-write is left out, saying so."""
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(read_lines(Path(path)))]


def read_lines(path: Path) -> list[str]:
    """The whole lines of a log (see `_read_lines`)."""
    return _read_lines(path)[0]


def _read_lines(path: Path) -> tuple[list[str], bool]:
    """The whole lines of a log, and whether its last line was torn. A write cut by a crash leaves a
    last line without its newline (the row's last character): it is dropped, with one warning line
    naming the file. A short row that ends in its newline was written so: an error where it is read."""
    pieces = read_regular(path).decode(errors="surrogateescape").split("\n")  # bytes kept as written (csv's \r\n)
    lines = [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    torn = bool(lines) and not lines[-1].endswith("\n")
    if torn:
        print(
            f"warning: {path}: its last line was cut off mid-write (a crash?) and is dropped: "
            f"{lines[-1].strip()[:60]!r}",
            file=sys.stderr,
        )
        lines.pop()
    return lines, torn


def _cells(line: str) -> list[str]:
    return next(csv.reader([line]), [])


def _csv_up_to(path: Path, lines: list[str], step: int) -> list[str]:
    """The header and the rows of a CSV log up to `step`."""
    header = _cells(lines[0])
    if "step" not in header:
        raise ValueError(
            f"{path} lacks a step column: is it a log that `train` wrote? move it out of the run directory"
        )
    column = header.index("step")
    return lines[:1] + [line for n, line in enumerate(lines[1:], 2) if _step(path, n, _cells(line)[column:]) <= step]


def _events_up_to(path: Path, lines: list[str], step: int) -> list[str]:
    """The notes of events.log up to `step`; a line without a step continues the note before it."""
    kept, keep = [], True
    for n, line in enumerate(lines, 1):
        head, tab, _ = line.partition("\t")
        if tab or n == 1:
            keep = _step(path, n, [head]) <= step
        if keep:
            kept.append(line)
    return kept


def _step(path: Path, n: int, cells: list[str]) -> int:
    """The step in the first of `cells` (line `n` of a log), or one line naming the file and the line."""
    try:
        return int(cells[0])
    except (IndexError, ValueError):
        raise ValueError(
            f"{path}, line {n}: no step number where one belongs; repair or remove that line, then resume again"
        ) from None


def rewrite(path: Path, lines: list[str]) -> None:
    """Replace `path` with `lines` atomically: written to a temporary file beside it, synced, then renamed
    over it, so that a crash at any point leaves either the old file or the new one, whole. (RunDir
    removes a temporary file that a SIGKILL left.)"""
    with atomic_write(path) as tmp:
        tmp.write_bytes("".join(lines).encode(errors="surrogateescape"))
