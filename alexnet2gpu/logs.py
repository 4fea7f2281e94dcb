"""What a run leaves for people to read: CSV files and TensorBoard events in the run directory.

RUN_DIR/train.csv   step, epoch, lr, loss, top1_err, img_per_s   (every log_every steps)
RUN_DIR/val.csv     epoch, step, lr, train_loss, loss, top1_err, top5_err
RUN_DIR/events.log  step<TAB>message: warnings of the run (the stuck-loss alarm)
RUN_DIR/tb/         the same, for `tensorboard --logdir RUN_DIR`
"""

from __future__ import annotations

import csv
from pathlib import Path

TRAIN_FIELDS = ("step", "epoch", "lr", "loss", "top1_err", "img_per_s")
VAL_FIELDS = ("epoch", "step", "lr", "train_loss", "loss", "top1_err", "top5_err")


class RunLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tb"))

    def _append(self, name: str, fields: tuple[str, ...], row: dict) -> None:
        path = self.dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row[k] for k in fields})

    def train(self, **row) -> None:
        self._append("train.csv", TRAIN_FIELDS, row)
        if self.writer:
            for key in ("loss", "top1_err", "lr", "img_per_s"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def val(self, **row) -> None:
        self._append("val.csv", VAL_FIELDS, row)
        if self.writer:
            for key in ("loss", "top1_err", "top5_err"):
                self.writer.add_scalar(f"val/{key}", row[key], row["step"])
            self.writer.flush()

    def note(self, step: int, message: str) -> None:
        """A line for people to read later: RUN_DIR/events.log and TensorBoard's text tab."""
        with (self.dir / "events.log").open("a") as f:
            f.write(f"{step}\t{message}\n")
        if self.writer:
            self.writer.add_text("events", message, step)

    def truncate_after(self, step: int) -> None:
        """On resume, forget rows written after the checkpoint's step (they will be redone)."""
        for name, key in (("train.csv", "step"), ("val.csv", "step")):
            path = self.dir / name
            if path.exists():
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
                fields = TRAIN_FIELDS if name == "train.csv" else VAL_FIELDS
                with path.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(r for r in rows if int(r[key]) <= step)
        events = self.dir / "events.log"
        if events.exists():
            lines = events.read_text().splitlines(keepends=True)
            events.write_text("".join(line for line in lines if int(line.split("\t", 1)[0]) <= step))

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def read_csv(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
