"""Training and evaluation: `train` runs (or resumes) a run, `evaluate` scores a model.

Nothing is lost: `RUN_DIR/last.pt` is rewritten atomically at every epoch end, at the end of a
run (also one cut short by max_steps) and on Ctrl-C or SIGTERM. Every random draw of a step is a
function of (seed, step), and the epoch's order of (seed, epoch), so a resumed run continues
exactly where the uninterrupted one would be.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from alexnet2gpu import checkpoint as ckpt
from alexnet2gpu.alarm import LossAlarm
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.datasets import InMemory, batches, build_dataset, num_batches
from alexnet2gpu.logs import RunLog
from alexnet2gpu.model import AlexNet2GPU, AlexNetFused
from alexnet2gpu.optim import load_scheduler, load_state, make_optimizer, make_scheduler, set_lr
from alexnet2gpu.stats import DataStats, load_or_fit
from alexnet2gpu.transforms import Pipeline


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the checkpoint."""


def build_model(config: AlexNetConfig, devices: tuple[torch.device, torch.device]) -> nn.Module:
    """The two towers on `devices`, or a one-tower net (towers=1) on the first device."""
    if config.towers == 2:
        return AlexNet2GPU(config, devices)
    return AlexNetFused(config, device=devices[0])


def input_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def take(dataset, n: int | None):
    """The first `n` images of a dataset (all when None)."""
    if n is None or n >= len(dataset):
        return dataset
    if isinstance(dataset, InMemory):
        return dataset.subset(n)
    subset = torch.utils.data.Subset(dataset, range(n))
    subset.num_classes, subset.channels = dataset.num_classes, dataset.channels
    return subset


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def autocast(model: nn.Module, amp: str) -> contextlib.ExitStack:
    """bfloat16 autocast on every device type the model spans (a no-op for amp="none")."""
    stack = contextlib.ExitStack()
    if amp == "bf16":
        for kind in sorted({p.device.type for p in model.parameters()}):
            stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16))
    return stack


def topk_errors(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Counts of images whose label is not among the top-k scores, for each k."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, k)
    hit = top == labels[:, None]
    return [float((~hit[:, :k].any(1)).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    pipeline: Pipeline,
    *,
    batch_size: int = 128,
    ten_crop: bool = False,
    amp: str = "none",
    workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Loss and top-1 / top-5 error. With `ten_crop`, the softmax averaged over the paper's ten
    patches (P 4.1), computed in chunks of at most `batch_size` crops so memory stays bounded."""
    model.eval()
    device = input_device(model)
    chunk = max(1, batch_size // 10) if ten_crop else batch_size
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0}
    bar = tqdm(total=len(dataset), desc="evaluating", unit="img", leave=False, disable=not progress)
    for images, labels in batches(dataset, chunk, shuffle=False, workers=workers):
        labels = labels.to(device)
        with autocast(model, amp):
            if ten_crop:
                crops = pipeline.ten_crops(images)  # (n, 10, C, 224, 224)
                probs = F.softmax(model(crops.flatten(0, 1)).float(), dim=1)  # (n * 10, classes)
                probs = probs.view(len(labels), 10, -1).mean(1)  # (n, classes)
            else:
                probs = F.softmax(model(pipeline(images)).float(), dim=1)
        totals["loss"] += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
        top1, top5 = topk_errors(probs, labels)
        totals["top1"] += top1
        totals["top5"] += top5
        totals["n"] += len(labels)
        bar.update(len(labels))
    bar.close()
    n = max(totals["n"], 1)
    return {"loss": totals["loss"] / n, "top1_err": totals["top1"] / n, "top5_err": totals["top5"] / n, "images": n}


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    best_val_top1: float = math.inf


class _Stop(Exception):
    """Raised by the SIGTERM handler so that the loop saves before it exits."""


def _checkpoint(model, optimizer, scheduler, state: RunState, configs: dict, stats: DataStats | None) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": ckpt.rng_state(),
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "best_val_top1": state.best_val_top1,
        "config": {name: c.to_dict() for name, c in configs.items()},
        "stats": stats.to_dict() if stats is not None else None,
    }


def prepare(model_config: AlexNetConfig, data: DataConfig, config: TrainConfig, resume: str | Path | None):
    """A run's training and validation sets, the checkpoint it resumes (refused if it holds another
    network) and, for the paper's pipeline, the training statistics (the checkpoint's, else fitted)."""
    train_set = build_dataset(data.dataset, "train", data.data, stage_size=data.stage_size, strict=data.strict)
    val_set = build_dataset(data.dataset, "val", data.data, stage_size=data.stage_size, strict=data.strict)
    train_set, val_set = take(train_set, data.subset), take(val_set, config.val_subset)
    checkpoint = ckpt.load(resume) if resume else None
    if checkpoint is not None:
        ckpt.check_compatible(checkpoint, model_config, resume)
    stats = None
    if data.preset == "paper":
        if checkpoint is not None and checkpoint.get("stats"):
            stats = DataStats.from_dict(checkpoint["stats"])
        else:
            limit = data.fit_images
            stats = load_or_fit(train_set, name=data.dataset, data=data.data, stage_size=data.stage_size, limit=limit)
    return train_set, val_set, checkpoint, stats


def train(
    model_config: AlexNetConfig,
    data: DataConfig,
    config: TrainConfig,
    devices: tuple[torch.device, torch.device],
    out: str | Path,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> dict:
    """Train (or resume) a run in `out`; returns the last validation metrics and the run's state."""
    out = Path(out)
    say = tqdm.write if progress else (lambda *_: None)
    train_set, val_set, checkpoint, stats = prepare(model_config, data, config, resume)

    torch.manual_seed(config.seed)  # the initial weights
    model = build_model(model_config, devices)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    state = RunState()
    log = RunLog(out, tensorboard=tensorboard)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        load_state(optimizer, model, checkpoint["optimizer"], config)  # the groups follow config.bias_rule
        load_scheduler(scheduler, optimizer, checkpoint["scheduler"], config)
        ckpt.set_rng_state(checkpoint["rng"])
        state = RunState(checkpoint["step"], checkpoint["epoch"], checkpoint["batch"], checkpoint["best_val_top1"])
        log.truncate_after(state.step)
        say(f"resumed {resume} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if config.compile else model
    device = input_device(model)
    train_pipe = Pipeline(data, stats, device, train=True)
    val_pipe = Pipeline(data, stats, device, train=False)
    configs = {"model": model_config, "data": data, "train": config}
    last = out / "last.pt"
    steps_per_epoch = num_batches(train_set, config.batch_size)
    if device.type == "cpu":
        say("no CUDA device: training on the CPU (slow; make train-2gpu / train-1gpu use GPUs when present)")

    def save() -> None:
        ckpt.save(_checkpoint(model, optimizer, scheduler, state, configs, stats), last)

    def on_sigterm(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    val: dict = {}
    alarm = LossAlarm(model_config.num_classes, config, steps_per_epoch)
    try:
        while state.epoch < config.epochs and not _done(state, config):
            model.train()
            bar = tqdm(
                total=steps_per_epoch,
                initial=state.batch,
                desc=f"epoch {state.epoch + 1}/{config.epochs}",
                unit="step",
                disable=not progress,
                dynamic_ncols=True,
            )
            running, seen, wrong, tick = 0.0, 0, 0.0, time.perf_counter()
            stream = batches(
                train_set,
                config.batch_size,
                shuffle=True,
                seed=config.seed,
                epoch=state.epoch,
                start=state.batch,
                workers=data.workers,
            )
            for images, labels in stream:
                if _done(state, config):
                    break
                torch.manual_seed(step_seed(config.seed, state.step))  # dropout masks
                x = train_pipe(images, torch.Generator().manual_seed(step_seed(config.seed, state.step)))
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels.to(device, non_blocking=True)
                with autocast(model, config.amp):
                    logits = runner(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingError(
                        f"loss is {value} at step {state.step + 1}; stopped without saving, "
                        f"the last good checkpoint is {last if last.exists() else 'none (none was written yet)'}"
                    )
                warning = alarm.observe(state.step + 1, value)  # a diverging or flat loss: say so, once
                if warning:
                    say(warning)
                    log.note(state.step + 1, warning)
                if state.step < config.warmup_steps:
                    set_lr(optimizer, config.lr * (state.step + 1) / config.warmup_steps)
                optimizer.step()
                state.step += 1
                state.batch += 1
                running += value * len(y)
                wrong += topk_errors(logits.detach().float(), y, (1,))[0]
                seen += len(y)
                bar.update(1)
                if device.type == "cpu" and state.batch == 3:
                    per_step = (time.perf_counter() - tick) / 3
                    say(
                        f"CPU: {per_step:.1f} s/step, about {_hms(per_step * steps_per_epoch)} "
                        f"per epoch of {steps_per_epoch} steps"
                    )
                if state.step % config.log_every == 0 or state.batch == steps_per_epoch or _done(state, config):
                    rate = seen / (time.perf_counter() - tick)
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{running / seen:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:g}")
                    log.train(
                        step=state.step,
                        epoch=state.epoch + 1,
                        lr=lr,
                        loss=running / seen,
                        top1_err=wrong / seen,
                        img_per_s=rate,
                    )
            else:  # the epoch ran to its end: validate, schedule, save
                bar.close()
                val = evaluate(
                    runner,
                    val_set,
                    val_pipe,
                    batch_size=config.batch_size,
                    amp=config.amp,
                    workers=data.workers,
                    progress=progress,
                )
                lr = optimizer.param_groups[0]["lr"]
                train_loss = running / max(seen, 1)
                log.val(
                    epoch=state.epoch + 1,
                    step=state.step,
                    lr=lr,
                    train_loss=train_loss,
                    loss=val["loss"],
                    top1_err=val["top1_err"],
                    top5_err=val["top5_err"],
                )
                say(
                    f"epoch {state.epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, "
                    f"val loss {val['loss']:.4f}, top-1 err {val['top1_err']:.2%}, top-5 err {val['top5_err']:.2%}, "
                    f"lr {lr:g}"
                )
                scheduler.step(val["top1_err"])
                state.best_val_top1 = min(state.best_val_top1, val["top1_err"])
                state.epoch += 1
                state.batch = 0
                save()
                continue
            bar.close()
        save()
    except (KeyboardInterrupt, _Stop):
        save()
        say(f"stopped at step {state.step}; saved {last}: continue with --resume {last}")
        raise KeyboardInterrupt from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        log.close()
    return {"step": state.step, "epoch": state.epoch, "val": val, "checkpoint": str(last)}


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _done(state: RunState, config: TrainConfig) -> bool:
    return config.max_steps is not None and state.step >= config.max_steps


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
