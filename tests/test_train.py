"""Training: the loss goes down, the update rule is the paper's, nothing is lost, resume is exact,
and bad input ends in one line."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU, SMALL

import alexnet2gpu.train.loop as loop
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.data.transforms import SeedPipeline  # DATA is the seed preset: its class does the crops
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.errors import TrainingError
from alexnet2gpu.train.logs import read_csv
from alexnet2gpu.train.optim import PaperSGD, make_scheduler

MODEL = AlexNetConfig(num_classes=10, init="he")
# 16 fake images in batches of 8: two steps an epoch, so runs cross epoch ends
DATA = DataConfig(dataset="fake", preset="seed", subset=16)


def run(out: Path, max_steps: int, resume: Path | None = None, **overrides) -> dict:
    config = TrainConfig(
        **{
            "epochs": 10,
            "batch_size": 8,
            "max_steps": max_steps,
            "val_subset": 8,
            "seed": 3,
            "log_every": 1,
            **overrides,
        }
    )
    return loop.train(MODEL, DATA, config, CPU, out, resume=resume, progress=False, tensorboard=False)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["model"]


# ---------------------------------------------------------------------------------------------
# the update rule and the schedule


def test_paper_update_rule_by_hand() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = PaperSGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    g1, g2 = torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25])
    w.grad = g1
    opt.step()
    v1 = -0.01 * 0.1 * torch.tensor([1.0, -2.0]) - 0.1 * g1  # v <- 0.9*0 - wd*lr*w - lr*g
    w1 = torch.tensor([1.0, -2.0]) + v1
    assert torch.allclose(w.data, w1)
    opt.param_groups[0]["lr"] = 0.01  # an lr drop: the old velocity keeps its size (P 5)
    w.grad = g2
    opt.step()
    v2 = 0.9 * v1 - 0.01 * 0.01 * w1 - 0.01 * g2
    assert torch.allclose(w.data, w1 + v2)
    # torch.optim.SGD takes the same first step but rescales the velocity after the drop
    u = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    sgd = torch.optim.SGD([u], lr=0.1, momentum=0.9, weight_decay=0.01)
    u.grad = g1
    sgd.step()
    assert torch.allclose(u.data, w1)
    sgd.param_groups[0]["lr"] = 0.01
    u.grad = g2
    sgd.step()
    assert not torch.allclose(u.data, w.data)


def test_lr_drops_by_ten_at_most_three_times() -> None:
    opt = PaperSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = make_scheduler(opt, TrainConfig(lr=0.01, lr_patience=0, schedule="plateau"))  # P 5's rule
    lrs = []
    for _ in range(8):
        scheduler.step(0.5)  # the validation error never improves
        lrs.append(opt.param_groups[0]["lr"])
    # the first step only records the best error; then one drop per step, three in all
    assert lrs == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5])


# ---------------------------------------------------------------------------------------------
# training


def test_a_few_steps_on_fake_data_lower_the_loss(tmp_path: Path) -> None:
    """The narrow net without dropout memorises 8 fake images (one batch, an epoch a step): the loss
    leaves chance, ln 10 = 2.30, and falls well below where it started."""
    model = dataclasses.replace(SMALL, dropout=0.0)
    data = dataclasses.replace(DATA, subset=8)
    config = TrainConfig(epochs=40, batch_size=8, max_steps=30, val_subset=8, seed=3, log_every=1)
    loop.train(model, data, config, CPU, tmp_path, progress=False, tensorboard=False)
    losses = [row["loss"] for row in read_csv(tmp_path / "train.csv")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:2]) / 2 and max(losses[-5:]) < math.log(10) - 0.3, losses
    val = read_csv(tmp_path / "val.csv")
    assert [row["epoch"] for row in val] == list(range(1, 31))


def test_resume_after_ctrl_c_ends_bit_identical(tmp_path: Path, monkeypatch) -> None:
    straight = tmp_path / "straight"
    run(straight, max_steps=5)

    interrupted = tmp_path / "interrupted"
    real = SeedPipeline.__call__
    calls = []

    def ctrl_c_on_third_step(self, images, generator=None, rows=None):
        calls.extend([1] if self.train else [])
        if self.train and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the step goes on; the loop stops after it
        return real(self, images, generator, rows)

    monkeypatch.setattr(SeedPipeline, "__call__", ctrl_c_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, max_steps=5)
    monkeypatch.setattr(SeedPipeline, "__call__", real)
    saved = ckpt.load(interrupted / "last.pt")
    assert (saved["step"], saved["epoch"], saved["batch"]) == (3, 1, 1)

    run(interrupted, max_steps=5, resume=interrupted / "last.pt")
    a, b = weights(straight / "last.pt"), weights(interrupted / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.load(interrupted / "last.pt")["step"] == 5


def test_resume_mid_epoch_from_max_steps_ends_bit_identical(tmp_path: Path) -> None:
    run(tmp_path / "straight", max_steps=4)
    run(tmp_path / "split", max_steps=3)
    assert ckpt.load(tmp_path / "split" / "last.pt")["batch"] == 1  # stopped inside epoch 2
    run(tmp_path / "split", max_steps=4, resume=tmp_path / "split" / "last.pt")
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [row["step"] for row in read_csv(tmp_path / "split" / "train.csv")]
    assert steps == [1, 2, 3, 4]


def test_sigterm_saves_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    real, calls = SeedPipeline.__call__, []

    def sigterm_on_second_step(self, images, generator=None, rows=None):
        calls.extend([1] if self.train else [])
        if self.train and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, images, generator, rows)

    monkeypatch.setattr(SeedPipeline, "__call__", sigterm_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, max_steps=5)
    assert ckpt.load(tmp_path / "last.pt")["step"] == 2  # the step under way when the signal came
    assert signal.getsignal(signal.SIGTERM) is not None


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run(tmp_path, max_steps=2)  # one epoch: last.pt at step 2
    before = weights(tmp_path / "last.pt")
    real, calls = loop.F.cross_entropy, []

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop.F, "cross_entropy", nan_on_second_call)
    with pytest.raises(
        TrainingError,
        match=r"loss is nan at step 4 on rank 0; stopped without saving; the last checkpoint is .*last.pt \(step 2\)",
    ):
        run(tmp_path, max_steps=6, resume=tmp_path / "last.pt")
    after = weights(tmp_path / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_layout_loads_with_weights_only(tmp_path: Path) -> None:
    run(tmp_path, max_steps=1)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "epoch", "config", "stats"} <= saved.keys()
    assert "tower_a.conv1.weight" in saved["model"]
    assert AlexNetConfig.from_dict(saved["config"]["model"]) == MODEL
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def small_checkpoint(value: float) -> dict:
    return {"model": {"w": torch.full((256, 256), value)}, "step": 1}


def test_a_disk_too_small_is_refused_before_writing(tmp_path: Path, monkeypatch) -> None:
    ckpt.save(small_checkpoint(1.0), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    free = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: free._replace(free=1000))
    with pytest.raises(ckpt.CheckpointError, match=r"needs about 0.2 MiB.*0.0 MiB free.*--out"):
        ckpt.save(small_checkpoint(2.0), tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_write_that_fails_midway_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    ckpt.save(small_checkpoint(1.0), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()

    def full_disk(obj, f):  # what torch.save does when the disk fills: a partial file, then an opaque error
        Path(f).write_bytes(b"PK" + bytes(100))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 694912 vs 694800")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write .*unexpected pos.*free on its disk.*unchanged"):
        ckpt.save(small_checkpoint(2.0), tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_size_estimate_counts_every_tensor() -> None:
    model = {"a": torch.zeros(10, 10), "b": [torch.zeros(5, dtype=torch.float64), (torch.zeros(3, dtype=torch.uint8),)]}
    assert ckpt.tensor_bytes({"model": model, "step": 3, "name": "x"}) == 400 + 40 + 3


def test_plot_writes_curves_and_kernels(tmp_path: Path) -> None:
    from alexnet2gpu.analysis.plot import plot_run

    run(tmp_path, max_steps=1, log_every=10)  # cut short before the first logging step: still logged
    assert [row["step"] for row in read_csv(tmp_path / "train.csv")] == [1]
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["curves.png", "conv1_kernels.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# ---------------------------------------------------------------------------------------------
# bad input through the command line: one line, non-zero exit, no traceback


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(loop.__file__).parents[1])}  # the package under test
    return subprocess.run(
        [sys.executable, "-m", "alexnet2gpu", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fake-run")
    run(out, max_steps=1)
    return out / "last.pt"


def one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


def test_cli_corrupt_checkpoint(tmp_path: Path, fake_checkpoint: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(fake_checkpoint.read_bytes()[:5000])
    one_line_error(cli("evaluate", "--checkpoint", str(bad), cwd=tmp_path), "cannot read checkpoint .*bad.pt")


def test_cli_checkpoint_of_another_network(tmp_path: Path, fake_checkpoint: Path) -> None:
    args = ["--dataset", "fake", "--preset", "seed", "--devices", "cpu", "--init", "he", "--input-size", "227"]
    result = cli("train", *args, "--resume", str(fake_checkpoint), "--out", str(tmp_path), cwd=tmp_path)
    one_line_error(result, "input_size=224 \\(this run: 227\\)")


def test_cli_missing_device_and_missing_data(tmp_path: Path) -> None:
    one_line_error(cli("train", "--dataset", "fake", "--devices", "cuda:1", cwd=tmp_path), "cuda:1 does not exist")
    missing = cli(
        "train", "--dataset", "imagenet", "--data", str(tmp_path / "nowhere"), "--devices", "cpu", cwd=tmp_path
    )
    one_line_error(missing, "lacks train/")


def test_cli_flags_reach_the_run_configs(tmp_path: Path, capsys) -> None:
    from alexnet2gpu.cli import main

    model_flags = ["--init", "he", "--no-lrn", "--pooling", "non-overlapping", "--activation", "tanh"]
    model_flags += ["--dropout", "0.25", "--input-size", "227"]
    train_flags = ["-b", "4", "--max-steps", "1", "--lr", "0.02", "--optimizer", "sgd", "--warmup-steps", "5"]
    train_flags += ["--bias-rule", "paper"]
    data_flags = ["--dataset", "fake", "--preset", "paper", "--subset", "4", "--no-pca-noise", "--flip", "off"]
    rest = ["--devices", "cpu", "--val-subset", "4", "--out", str(tmp_path), "--no-tensorboard"]
    main(["train", *model_flags, *train_flags, *data_flags, *rest])
    saved = ckpt.load(tmp_path / "last.pt")["config"]
    model = AlexNetConfig.from_dict(saved["model"])
    assert (model.init, model.lrn, model.pooling, model.activation, model.dropout, model.input_size) == (
        "he",
        False,
        "non-overlapping",
        "tanh",
        0.25,
        227,
    )
    assert (saved["data"]["pca_noise"], saved["data"]["flip"], saved["data"]["crop_size"]) == (False, False, 227)
    train = saved["train"]
    assert (train["lr"], train["optimizer"], train["warmup_steps"], train["max_steps"]) == (0.02, "sgd", 5, 1)
    assert train["bias_rule"] == "paper"
    assert '"step": 1' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "batch"),
    [
        (["--dataset", "fashion-mnist"], 60),  # the seed's batch for the 28x28 sets
        (["--dataset", "mnist"], 60),
        (["--dataset", "imagenet"], 128),  # P 5's
        ([], 128),
        (["--dataset", "fashion-mnist", "-b", "128"], 128),
    ],
)
def test_the_default_batch_is_the_seeds_for_28x28_sets_and_p5s_for_the_rest(flags: list[str], batch: int) -> None:
    from alexnet2gpu.cli import build_parser, train_config

    assert train_config(build_parser().parse_args(["train", *flags])).batch_size == batch
