"""What every experiment shares: its sizes, one training run, evaluation and the RESULTS.md entry.

Sizes: "tiny" (the test suite's smoke run: a handful of images and steps, every network an eighth of its
width, which keeps each layer and exchange), "cpu" (minutes on 2 cores:
a Fashion-MNIST subset, one epoch) and "gpu" (the full variant: whole training set, the seed's 30
epochs; run it where a GPU is, e.g. `python experiments/seed_run.py --size gpu`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alexnet2gpu.analysis.inference import load_trained
from alexnet2gpu.bench import machine
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.data.datasets import datasets_for
from alexnet2gpu.data.sampling import take
from alexnet2gpu.devices import resolve_devices
from alexnet2gpu.train.evaluate import evaluate, percent
from alexnet2gpu.train.logs import read_csv
from alexnet2gpu.train.loop import train

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"


@dataclass(frozen=True)
class Size:
    subset: int | None  # training images
    epochs: int
    val: int | None  # test images for centre-crop evaluation
    ten_crop: int | None  # test images for ten-crop evaluation
    max_steps: int | None = None
    narrow: bool = False  # an eighth of every layer's width: the code path of each variant, in seconds


SIZES = {
    "tiny": Size(subset=16, epochs=1, val=8, ten_crop=4, max_steps=2, narrow=True),
    "cpu": Size(subset=2000, epochs=1, val=500, ten_crop=200),
    "gpu": Size(subset=None, epochs=30, val=None, ten_crop=None),
}

# The recipe that leaves chance within a CPU budget: the seed's input scaling, He init, the paper's
# SGD (lr 0.01, momentum 0.9, weight decay 5e-4) and batch; every other field K12's, the defaults.
# The paper's own N(0, 0.01) init needs far more steps on 10 classes (see README, Training). Runs in
# RESULTS.md dated before 2026-12-04 had the defaults of then (P's text, Caffe's init, P's bias rule).
BASE_MODEL = AlexNetConfig(num_classes=10, in_channels=1, init="he")
BASE_DATA = DataConfig(dataset="fashion-mnist", preset="seed")
BASE_TRAIN = TrainConfig(batch_size=32, log_every=5)


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--devices", default=None, help="default: both GPUs, one GPU, or the CPU")
    p.add_argument("--out", default="runs/experiments", help="run directories go under here")
    p.add_argument("--results", default=str(RESULTS), help="the Markdown file the result is appended to")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    return p.parse_args()


def run(name: str, args, model: AlexNetConfig, data: DataConfig, config: TrainConfig) -> dict:
    """Train one variant at the chosen size; returns its training curve, test errors and time."""
    size = SIZES[args.size]
    model = narrowed(model) if size.narrow else model
    data = replace(data, subset=size.subset, data=args.data or data.data, workers=0)
    config = replace(config, epochs=size.epochs, max_steps=size.max_steps, val_subset=size.val)
    out = Path(args.out) / args.size / name
    devices = resolve_devices(args.devices)
    start = time.perf_counter()
    # a rerun replaces the variant's own earlier run, under the run folder's lock (RunDir), and nothing else
    result = train(model, data, config, devices, out, progress=False, tensorboard=False, overwrite=True)
    seconds = time.perf_counter() - start
    return {"name": name, "dir": out, "seconds": seconds, "val": result["val"], "curve": read_csv(out / "train.csv")}


def narrowed(model: AlexNetConfig) -> AlexNetConfig:
    """The same network at an eighth of the kernels (an even count, so the towers split it) and a 64th
    of the fully connected units."""
    return replace(
        model,
        conv_channels=tuple(max(2, c // 8 // 2 * 2) for c in model.conv_channels),
        fc_features=tuple(max(2, f // 64) for f in model.fc_features),
        fc_hidden=None if model.fc_hidden is None else max(2, model.fc_hidden // 64),
    )


def ten_crop_error(run_dir: Path, args) -> dict:
    """Centre crop and ten-crop on the same test images, from a run's checkpoint."""
    trained = load_trained(run_dir / "last.pt", args.devices)
    test = take(datasets_for(trained.configs[1], "val", host_decode=True), SIZES[args.size].ten_crop)
    model, pipeline = trained.model, trained.pipeline
    return {
        crop: evaluate(model, test, pipeline, batch_size=100, ten_crop=crop == "ten-crop", progress=False)
        for crop in ("centre", "ten-crop")
    }


def paper_preset(data: DataConfig) -> DataConfig:
    """The paper's pipeline (mean image, random crops, PCA noise) at unit input scale for He init."""
    return replace(data, preset="paper", pixel_scale=1 / 0.3081)


def record(args, title: str, command: str, lines: list[str], figure: Path | None = None) -> None:
    """Append an entry to RESULTS.md (date, machine, command, numbers, figure) and print it."""
    where = "GPU" if torch.cuda.is_available() else "CPU"
    entry = [
        f"## {title} ({args.size} size, {where})",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "",
        *lines,
        "",
    ]
    if figure is not None:  # copied beside RESULTS.md: run directories are not committed
        figures = Path(args.results).resolve().parent / "figures"
        figures.mkdir(exist_ok=True)
        kept = figures / f"{title.split(':')[0].lower().replace(' ', '-')}-{Path(figure).stem}-{args.size}.png"
        shutil.copyfile(figure, kept)
        entry += [f"![{title}](figures/{kept.name})", ""]
    text = "\n".join(entry) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


def errors_line(name: str, r: dict) -> str:
    v = r["val"]
    return f"| {name} | {100 * v['top1_err']:.1f}% | {percent(v['top5_err'])} | {v['images']} | {r['seconds']:.0f} s |"


TABLE_HEAD = ["| variant | test top-1 error | top-5 error | test images | train time |", "|---|---|---|---|---|"]


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
