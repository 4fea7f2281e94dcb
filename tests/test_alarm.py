"""The stuck-loss alarm: one line when the loss diverges or sits at chance, none when it learns."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from conftest import CPU, SMALL

import alexnet2gpu.train.loop as loop
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.train.alarm import LossAlarm
from alexnet2gpu.train.logs import RunLog, read_csv

CHANCE = math.log(10)


def warnings(losses: list[float], config: TrainConfig | None = None, steps_per_epoch: int = 0) -> list[tuple[int, str]]:
    alarm = LossAlarm(10, config or TrainConfig(), steps_per_epoch)
    return [(step, w) for step, loss in enumerate(losses, 1) if (w := alarm.observe(step, loss))]


def test_a_diverging_loss_warns_once_after_the_first_steps() -> None:
    losses = [14.0] * 5 + [8.0] * 100  # the paper's init on Fashion-MNIST overshoots and stays up
    fired = warnings(losses)
    assert [step for step, _ in fired] == [21]  # judged only after alarm_after_steps=20
    assert "diverging" in fired[0][1] and "--init caffe" in fired[0][1] and "--lr" in fired[0][1]


def test_an_early_overshoot_that_comes_back_is_not_diverging() -> None:
    losses = [14.0] * 5 + [2.0 - 0.005 * i for i in range(200)]
    assert warnings(losses) == []


def test_a_loss_flat_at_chance_warns_once_after_the_window() -> None:
    # a stuck run's loss wobbles around ln 10 by more than the margin (0.05) from step to step
    losses = [CHANCE + 0.07 * (-1) ** i for i in range(1000)]
    fired = warnings(losses)
    assert [step for step, _ in fired] == [TrainConfig().alarm_flat_steps]  # no epoch length given
    assert "flat" in fired[0][1] and "--init caffe" in fired[0][1] and "--bias-rule convnet" in fired[0][1]


def test_the_flat_window_is_half_an_epoch_when_that_is_longer() -> None:
    losses = [CHANCE] * 1000
    assert [step for step, _ in warnings(losses, steps_per_epoch=469)] == [235]  # Fashion-MNIST, batch 128
    assert [step for step, _ in warnings(losses, steps_per_epoch=47)] == [100]  # alarm_flat_steps
    assert warnings(losses, TrainConfig(alarm_flat_steps=0), steps_per_epoch=469) == []


def test_a_loss_that_learns_after_a_flat_start_is_silent() -> None:
    # chance for 60 steps (Caffe's init on Fashion-MNIST: about 25), then down by 0.01 a step
    losses = [CHANCE] * 60 + [max(CHANCE - 0.01 * i, 0.3) for i in range(1500)]
    assert warnings(losses) == []
    assert warnings(losses, steps_per_epoch=469) == []


def test_the_thresholds_scale_with_the_classes() -> None:
    alarm = LossAlarm(1000, TrainConfig(alarm_window=1, alarm_after_steps=0, alarm_flat_steps=2))
    assert alarm.observe(1, 9.0) is None  # 1.3 ln 1000: high, not diverging
    assert alarm.observe(2, 6.95) is None
    assert "flat" in alarm.observe(3, 6.85)  # the mean of 6.95 and 6.85 is within 2% of 6.91
    assert "diverging" in alarm.observe(4, 11.0)  # above 1.5 ln 1000 = 10.4


def test_notes_go_to_events_log_and_a_resume_forgets_those_after_its_step(tmp_path: Path) -> None:
    log = RunLog(tmp_path, tensorboard=False)
    log.note(3, "warning: a")
    log.note(9, "warning: b")
    log.truncate_after(5)
    assert (tmp_path / "events.log").read_text() == "3\twarning: a\n"


# ---------------------------------------------------------------------------------------------
# real runs on fake data, with the windows shrunk to a few steps


def real_run(
    out: Path, init: str, lr: float, preset: str, steps: int, model=None, subset: int = 16, flat_steps: int = 3
) -> list[str]:
    shrunk = dict(alarm_window=2, alarm_after_steps=5, alarm_flat_steps=flat_steps)
    config = TrainConfig(epochs=40, batch_size=8, max_steps=steps, lr=lr, val_subset=8, seed=3, log_every=1, **shrunk)
    data = DataConfig(dataset="fake", preset=preset, subset=subset)
    model = model or AlexNetConfig(num_classes=10, init=init)
    loop.train(model, data, config, CPU, out, progress=False, tensorboard=False)
    events = out / "events.log"
    return events.read_text().splitlines() if events.exists() else []


def test_real_runs_fire_when_stuck_and_stay_silent_when_learning(tmp_path: Path) -> None:
    diverging = real_run(tmp_path / "paper-init", "paper", 0.01, "paper", 6)  # P's init on 0-255 pixels
    assert len(diverging) == 1 and "diverging" in diverging[0], diverging
    flat = real_run(tmp_path / "tiny-lr", "caffe", 1e-7, "seed", 4)
    assert len(flat) == 1 and "flat" in flat[0], flat
    # a run that learns: the narrow net without dropout memorising 8 images, one batch a step; it passes
    # chance on its way down (the mean of its first 6 steps is about ln 10), which 10 flat steps would be
    learns, small = tmp_path / "learns", dataclasses.replace(SMALL, dropout=0.0)
    assert real_run(learns, "he", 0.01, "seed", 30, model=small, subset=8, flat_steps=10) == []
    losses = [row["loss"] for row in read_csv(learns / "train.csv")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:2]) / 2 and max(losses[-5:]) < math.log(10) - 0.3, losses


def test_a_resumed_run_hears_what_the_alarm_heard_and_never_repeats_a_warning(tmp_path) -> None:
    """The alarm's windows and the warnings it gave are in the checkpoint: a run cut and resumed
    writes the events.log of an uninterrupted one."""
    import dataclasses

    from alexnet2gpu.config import AlexNetConfig, DataConfig
    from alexnet2gpu.train.loop import train

    cpu = (torch.device("cpu"), torch.device("cpu"))
    model = AlexNetConfig.one_gpu(num_classes=10, in_channels=3, init="he")
    data = DataConfig(dataset="fake", preset="seed", subset=40)
    config = TrainConfig(
        batch_size=4, epochs=1, max_steps=6, log_every=1, val_subset=4, alarm_window=2, alarm_after_steps=1
    )
    config = dataclasses.replace(config, alarm_diverge_factor=0.3, alarm_flat_steps=0)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(model, data, config, cpu, whole, progress=False, tensorboard=False)
    train(model, data, dataclasses.replace(config, max_steps=3), cpu, cut, progress=False, tensorboard=False)
    train(model, data, config, cpu, cut, resume=cut / "last.pt", progress=False, tensorboard=False)
    assert (whole / "events.log").read_text().count("warning") == 1
    assert (cut / "events.log").read_text() == (whole / "events.log").read_text()
