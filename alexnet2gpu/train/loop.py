"""The one training loop, for every placement of the towers.

`fit` runs (or resumes) a run on a placement (`alexnet2gpu.train.placement`): both towers in this process
(`train`, `make train-1gpu` / `train-2gpu`) or one tower per process (`alexnet2gpu.train.tower_ranks`,
`make train-dist`). The placement supplies what differs between them; the recipe (the paper's
schedule, warm-up, both optimisers, bf16, channels-last, compile), the NaN guard, signals, logs,
progress and resume exist here once.

Nothing is lost: `RUN_DIR/last.pt` is rewritten atomically at every epoch end, at the end of a
run (also one cut short by max_steps) and after Ctrl-C or SIGTERM, which only ask the loop to stop
at the next step boundary. Every random draw of a step is a function of (seed, step), and the
epoch's order of (seed, epoch), so a resumed run continues exactly where the uninterrupted one
would be, in either placement.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig, departures
from alexnet2gpu.data.base import Categories, DatasetError
from alexnet2gpu.data.datasets import (
    batches,
    check_classes,
    check_image_size,
    datasets_for,
    num_batches,
    worker_killed,
)
from alexnet2gpu.data.sampling import sample_note, take
from alexnet2gpu.data.stats import DataStats, load_or_fit
from alexnet2gpu.data.transforms import Pipeline, input_pipeline
from alexnet2gpu.model.layers import step_seed
from alexnet2gpu.progress import progress_bar
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.alarm import LossAlarm
from alexnet2gpu.train.errors import EvaluationError, TrainingError
from alexnet2gpu.train.evaluate import autocast, evaluate, percent, topk_errors
from alexnet2gpu.train.logs import RunLog
from alexnet2gpu.train.optim import Plateau, Recorded, make_optimizer, make_scheduler, set_lr, weights_lr
from alexnet2gpu.train.panel import log_predictions, panel_images
from alexnet2gpu.train.placement import Placement
from alexnet2gpu.train.rundir import RunDir

__all__ = ["fit", "train"]


# ---------------------------------------------------------------------------------------------
# a run: its state, its objects, and the loop


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    best_val_top1: float = math.inf


@dataclass
class Totals:
    """Sums over the global batches of an epoch so far (every replica's rows), saved with the
    checkpoint so that a resumed epoch logs the same running means; the timing is this process's."""

    loss: float = 0.0
    wrong: float = 0.0
    images: float = 0.0
    since: float = field(default_factory=time.perf_counter)
    timed_images: float = 0.0  # images since `since`, for the rate

    def to_list(self) -> list[float]:
        return [self.loss, self.wrong, self.images]


class StopRequest:
    """SIGTERM and Ctrl-C only set a flag; the loop stops at the next step boundary and saves.

    A second signal while it saves is counted and otherwise ignored, so the save is never cut."""

    def __init__(self) -> None:
        self.signals = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1 and hasattr(signal, "SIGCHLD"):
            # A SIGTERM to the whole process group also ends the data loader's workers, and the
            # loader's SIGCHLD handler would raise inside this step; their end is noticed at the
            # next batch instead, where the loop stops anyway (restored on exit).
            self.previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    def __bool__(self) -> bool:
        return self.signals > 0

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@dataclass
class Run:
    """Everything the loop reads and updates; built by `start`."""

    placement: Placement
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Plateau | Recorded
    state: RunState
    configs: dict
    stats: DataStats | None
    categories: Categories | None  # the training set's classes, kept in every checkpoint
    train_pipe: Pipeline
    val_pipe: Pipeline
    log: RunLog | None
    last: Path
    say: object
    progress: bool
    alarm: LossAlarm
    stop: StopRequest = field(default_factory=StopRequest)  # this process's signals
    stopping: bool = False  # every process agreed to stop (a signal reached one of them)
    pending: list = field(default_factory=list)  # (step, rows, device sums) of the steps not read yet
    saved_step: int | None = None  # the step of the checkpoint this run last wrote or resumed
    timed: bool = False  # the CPU's pace was said
    totals: Totals = field(default_factory=Totals)  # the current epoch's
    panel: tuple[torch.Tensor, torch.Tensor] | None = None  # TensorBoard's top-5 images and labels (`log_predictions`)

    @property
    def config(self) -> TrainConfig:
        return self.configs["train"]

    @property
    def data(self) -> DataConfig:
        return self.configs["data"]


def prepare(placement: Placement, model_config: AlexNetConfig, data: DataConfig, config: TrainConfig, resume):
    """The checkpoint a run resumes (refused, before any data is read, if it holds another network or
    other options), its training and validation sets and, for the paper's pipeline, the training
    statistics (the checkpoint's, else fitted). Checkpoint and statistics are read once, on rank 0."""

    def read() -> dict | None:
        checkpoint = ckpt.load(resume) if resume else None
        if checkpoint is not None:
            ckpt.check_resume(checkpoint, {"model": model_config, "data": data, "train": config}, resume)
        return checkpoint

    checkpoint = placement.on_rank0(read)
    full_train, full_val = datasets_for(data, "train"), datasets_for(data, "val")
    if checkpoint is not None:
        saved = checkpoint.get("stats")
        for dataset in (full_train, full_val):
            check_classes(dataset, ckpt.categories(checkpoint), model_config.num_classes, resume)
            check_image_size(dataset, saved["mean"] if saved else None, resume)
    train_set, val_set = take(full_train, data.subset), take(full_val, config.val_subset, stratified=True)
    notes = [
        sample_note("--subset", data.subset, full_train, train_set),
        sample_note("--val-subset", config.val_subset, full_val, val_set),
    ]
    if num_batches(train_set, config.batch_size, drop_last=placement.replicas > 1) == 0:
        raise DatasetError(
            f"{getattr(train_set, 'name', data.dataset)}: {len(train_set)} training images make no batch of "
            f"{config.batch_size}{f' over {placement.replicas} tower pairs' if placement.replicas > 1 else ''}; "
            "add images or lower -b"
        )
    steps = num_batches(train_set, config.batch_size, drop_last=placement.replicas > 1)
    if checkpoint is not None and checkpoint["step"] > checkpoint["epoch"] * steps + checkpoint["batch"]:
        raise DatasetError(
            f"{resume} is at step {checkpoint['step']}, more than its {checkpoint['epoch']} epochs of {steps} batches "
            f"and {checkpoint['batch']} more account for: it was edited, or the training set is not the one it was "
            "trained on (--data)"
        )
    if checkpoint is not None and checkpoint["batch"] > steps:
        raise DatasetError(
            f"{resume} is at batch {checkpoint['batch']} of an epoch, which has {steps} batches of its training "
            "set here: it was edited, or the training set is not the one it was trained on (--data)"
        )
    if config.batch_size > len(train_set) and placement.replicas == 1:  # said before the batch is allocated
        notes.append(
            f"note: -b {config.batch_size} is more than the {len(train_set):,} training images: every step is the "
            f"whole set, a batch of {len(train_set):,}"
        )
    if not len(val_set):
        raise DatasetError(f"{getattr(val_set, 'name', data.dataset)} holds no images: a run validates every epoch")

    def statistics() -> DataStats | None:
        if data.preset == "seed":
            return None
        if checkpoint is not None and checkpoint.get("stats"):
            return DataStats.from_dict(checkpoint["stats"])
        name = data.dataset + ("-squash" if data.squash else "")  # the caffe preset's images: cached apart
        fit = dict(name=name, data=data.data, stage_size=data.stage_size, limit=data.fit_images)
        return load_or_fit(train_set, **fit)

    return train_set, val_set, checkpoint, placement.on_rank0(statistics), [note for note in notes if note]


def start(placement, model_config, data, config, out, *, resume, progress, tensorboard) -> tuple[Run, object, object]:
    """Build the model and optimiser (from the checkpoint when resuming) and the run's logs."""
    train_set, val_set, checkpoint, stats, notes = prepare(placement, model_config, data, config, resume)
    torch.manual_seed(config.seed)  # the initial weights (drawn on the CPU): the same in every placement
    module = placement.build(model_config)
    if placement.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape: cuDNN times its algorithms once
    need = placement.checkpoint_bytes() + (ckpt.tensor_bytes(stats.to_dict()) if stats is not None else 0)
    placement.on_rank0(lambda: ckpt.check_room(Path(out) / "last.pt", need, replaces=True))  # now, not after an epoch
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, config)
    state, totals = RunState(), Totals()
    if checkpoint is not None:
        placement.load_model_state(checkpoint["model"], str(resume))
        placement.load_optimizer_state(optimizer, checkpoint["optimizer"], str(resume))
        scheduler.load_state_dict(checkpoint["scheduler"])
        ckpt.set_rng_state(checkpoint["rng"])
        state = RunState(checkpoint["step"], checkpoint["epoch"], checkpoint["batch"], checkpoint["best_val_top1"])
        totals = Totals(*checkpoint.get("epoch_totals", [0.0, 0.0, 0.0]))  # older checkpoints: from here on
    alarm = LossAlarm(model_config.num_classes, config, num_batches(train_set, config.batch_size))
    if checkpoint is not None and isinstance(checkpoint.get("alarm"), dict):
        alarm.load_state_dict(checkpoint["alarm"])
    writer = placement.writer
    # a resume drops the TensorBoard events after its step, as it drops the CSV rows
    purge = state.step + 1 if checkpoint is not None else None
    log = RunLog(out, tensorboard=tensorboard, purge_step=purge) if writer else None
    say = tqdm.write if (progress and writer) else (lambda *_: None)
    if log is not None and checkpoint is not None:
        log.truncate_after(state.step)
        say(f"resumed {resume} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    for note in notes:
        say(note)
    run = Run(
        placement=placement,
        runner=placement.runner(config.channels_last, config.compile),
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        configs={"model": model_config, "data": data, "train": config},
        stats=stats,
        categories=getattr(train_set, "categories", None),
        train_pipe=input_pipeline(data, stats, placement.device, train=True, channels_last=config.channels_last),
        val_pipe=input_pipeline(data, stats, placement.device, train=False, channels_last=config.channels_last),
        log=log,
        last=Path(out) / "last.pt",
        say=say,
        progress=progress and writer,
        alarm=alarm,
        saved_step=state.step if checkpoint is not None else None,
        totals=totals,
        panel=panel_images(val_set, writer) if tensorboard else None,
    )
    return run, train_set, val_set


def save(run: Run) -> None:
    """Write last.pt in the single-process layout (every process takes part; the writer writes).
    Weights that are not all finite are never saved: the run stops, naming the last checkpoint."""
    read_steps(run, run.totals)
    finite = bool(torch.stack([torch.isfinite(p).all() for p in run.placement.module.parameters()]).all())
    if not run.placement.gather(torch.tensor([float(finite)], dtype=torch.float64)).all():
        raise TrainingError(f"the weights are not finite at step {run.state.step}; not saved; {_last_words(run)}")
    model, optimizer = run.placement.model_state(), run.placement.optimizer_state(run.optimizer)
    if run.placement.writer:
        state = run.state
        checkpoint = ckpt.record(
            model=model,
            optimizer=optimizer,
            scheduler=run.scheduler.state_dict(),
            configs=run.configs,
            stats=run.stats,
            classes=run.categories,
            rng=ckpt.rng_state(),
            step=state.step,
            epoch=state.epoch,
            batch=state.batch,
            best_val_top1=state.best_val_top1,
            epoch_totals=run.totals.to_list(),
            alarm=run.alarm.state_dict(),
        )
        ckpt.save(checkpoint, run.last)
    run.placement.barrier()
    run.saved_step = run.state.step


def _done(state: RunState, config: TrainConfig) -> bool:
    return config.max_steps is not None and state.step >= config.max_steps


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One step on this process's rows of a global batch. Nothing here waits for the device: the
    step's loss and error count stay there until `read_steps` reads them, at a logging step."""
    config, placement, state = run.config, run.placement, run.state
    total = config.batch_size if placement.replicas > 1 else len(labels)  # rows of the global batch
    start = placement.shard(total).start
    torch.manual_seed(step_seed(config.seed, state.step))  # dropout masks of a one-tower net
    masks = placement.dropout_masks(config.seed, state.step, slice(start, start + len(labels)), total)
    x = run.train_pipe(images, torch.Generator().manual_seed(step_seed(config.seed, state.step)), (start, total))
    y = labels.to(placement.device, non_blocking=True)
    with autocast(run.runner, config.amp):
        logits = run.runner(x, masks)
    loss = F.cross_entropy(logits.float(), y)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * placement.loss_scale).backward()
    wrong = topk_errors(logits.detach().float(), y, (1,))[0]
    run.pending.append((state.step + 1, len(y), torch.stack([loss.detach().double() * len(y), wrong.double()])))
    if state.step < config.warmup_steps:
        set_lr(run.optimizer, config.base_lr * (state.step + 1) / config.warmup_steps)
    run.optimizer.step()
    state.step, state.batch = state.step + 1, state.batch + 1


def read_steps(run: Run, totals: Totals) -> None:
    """The losses and error counts of the steps since the last read, copied from the device at once
    (the one wait on it in training) and agreed over processes: a non-finite loss stops the run,
    naming its step; the alarm hears every step's global loss; the epoch's totals grow."""
    if not run.pending:
        return
    placement, steps = run.placement, [step for step, _, _ in run.pending]
    rows = torch.tensor([[n] for _, n, _ in run.pending], dtype=torch.float64)  # (k, 1)
    sums = torch.stack([value for _, _, value in run.pending]).cpu()  # (k, 2): loss * rows, top-1 errors
    run.pending.clear()
    every = placement.gather(torch.cat([sums, rows], 1).flatten()).view(-1, len(steps), 3)  # (world, k, 3)
    bad = ~torch.isfinite(every[:, :, 0])
    if bad.any():
        first = int(bad.any(0).nonzero()[0, 0])  # the first step with a non-finite loss on some rank
        ranks = bad[:, first].nonzero().flatten().tolist()
        loss = float(every[ranks[0], first, 0] / max(float(every[ranks[0], first, 2]), 1.0))
        late = "" if first == len(steps) - 1 else f" (read at step {steps[-1]}: losses are read every -p steps)"
        raise TrainingError(
            f"loss is {loss:g} at step {steps[first]} on rank {', '.join(map(str, ranks))}; stopped without saving; "
            f"{_last_words(run)}{late}"
        )
    for step, (loss, wrong, images) in zip(steps, (every.sum(0) / placement.copies).tolist(), strict=True):
        warning = run.alarm.observe(step, loss / images)  # the global loss: the same on every rank
        if warning and run.log is not None:
            run.say(warning)
            run.log.note(step, warning)
        totals.loss, totals.wrong, totals.images = totals.loss + loss, totals.wrong + wrong, totals.images + images
        totals.timed_images += images


def _out_of_memory(error: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory" (a RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _last_words(run: Run) -> str:
    """What a stop leaves: only a checkpoint this run wrote or resumed is named."""
    if run.saved_step is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint is {run.last} (step {run.saved_step})"


def log_step(run: Run, totals: Totals, steps_per_epoch: int, bar: tqdm) -> None:
    state, config = run.state, run.config
    if state.batch == 3 and run.placement.device.type == "cpu" and run.progress and not run.timed:
        run.timed = True  # said once a run: the first epoch's pace
        per_step = (time.perf_counter() - totals.since) / 3
        run.say(
            f"CPU: {per_step:.1f} s/step, about {_hms(per_step * steps_per_epoch)} per epoch of {steps_per_epoch} steps"
        )
    if not (state.step % config.log_every == 0 or state.batch == steps_per_epoch or _done(state, config)):
        return
    read_steps(run, totals)
    rate = totals.timed_images / (time.perf_counter() - totals.since)
    lr, loss = weights_lr(run.optimizer), totals.loss / totals.images
    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:g}")
    if run.log is not None:
        run.log.train(
            step=state.step,
            epoch=state.epoch + 1,
            lr=lr,
            loss=loss,
            top1_err=totals.wrong / totals.images,
            img_per_s=rate,
        )


def _until_stopped(stream, stop: StopRequest):
    """The batches of `stream`; if the loader's workers die after a stop was asked (a SIGTERM to the
    whole process group reaches them too), the stream just ends there, at a step boundary."""
    iterator = iter(stream)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except RuntimeError:
            if stop:
                return
            raise


def train_one_epoch(run: Run, train_set) -> Totals | None:
    """The rest of the current epoch; its totals if it ran to its end, None if it stopped early."""
    config, data, placement, state = run.config, run.data, run.placement, run.state
    steps = num_batches(train_set, config.batch_size, drop_last=placement.replicas > 1)
    desc = f"epoch {state.epoch + 1}/{config.epochs}"
    bar = progress_bar(
        total=steps, initial=state.batch, desc=desc, unit="step", disable=not run.progress, dynamic_ncols=True
    )
    run.runner.train()
    run.train_pipe.colour_noise = run.scheduler.colour_noise(state.epoch)  # off late in run 145's schedule
    if state.batch == 0:
        run.totals = Totals()
        if run.log is not None:  # every group's lr as this epoch has it (the 2012 schedule: every layer's)
            run.log.lrs(epoch=state.epoch + 1, step=state.step, groups=run.optimizer.param_groups)
    totals = run.totals
    totals.since, totals.timed_images = time.perf_counter(), 0.0
    stream = batches(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        epoch=state.epoch,
        start=state.batch,
        workers=data.workers,
        drop_last=placement.replicas > 1,
        shard=(placement.replica, placement.replicas),
        keep_empty=True,
    )
    try:
        try:
            _train_batches(run, _until_stopped(stream, run.stop), steps, totals, bar)
        except RuntimeError as error:  # a killed worker is reported wherever the main process is
            if not (run.stop and worker_killed(error)):
                raise (worker_killed(error) or error) from None
            run.stopping = True  # a signal to the process group reached the workers too: a stop
    except DatasetError as error:  # a worker killed or stuck, an unreadable image under --strict
        bar.close()
        unsaved = state.step != (run.saved_step or 0)
        if placement.world > 1 or not unsaved:  # other ranks are not at a save; or nothing new to keep
            raise DatasetError(f"{error}; {_last_words(run)}") from None
        save(run)  # the steps since the last save are kept
        raise DatasetError(f"{error}; saved {run.last} at step {state.step}") from None
    bar.close()
    read_steps(run, totals)
    run.stopping = run.stopping or placement.agree(1, bool(run.stop))[1]  # a signal during the last step
    ran_out = state.batch >= steps
    return totals if ran_out and not run.stopping else None


def _train_batches(run: Run, stream, steps: int, totals: Totals, bar) -> None:
    config, placement, state = run.config, run.placement, run.state
    for images, labels in stream:
        if _done(state, config):
            break
        rows, run.stopping = placement.agree(len(labels), bool(run.stop))  # on the host: no wait on the device
        if run.stopping:
            break
        if not rows:
            state.batch += 1  # every image of a share was unreadable: no step anywhere, the batch counted
            bar.update(1)
            continue
        train_step(run, images, labels)
        bar.update(1)
        log_step(run, totals, steps, bar)


def end_epoch(run: Run, val_set, totals: Totals) -> dict | None:
    """Validate, log, take the schedule's decision (the same on every process), save."""
    state, config = run.state, run.config
    try:
        val = evaluate(
            run.runner,
            val_set,
            run.val_pipe,
            batch_size=config.batch_size,
            amp=config.amp,
            workers=run.data.workers,
            progress=run.progress,
            placement=run.placement,
        )
    except EvaluationError as error:  # no number to report: keep what can be kept and say what is left
        where = f"validation after epoch {state.epoch + 1}: {error}"
        try:
            save(run)  # finite weights are kept (a resume validates again); non-finite ones raise, naming the last
        except TrainingError as unsaved:
            raise TrainingError(f"{where}; {unsaved}") from None
        raise TrainingError(f"{where}; saved {run.last} (step {state.step}) unvalidated") from None
    except RuntimeError:
        if not run.stop:
            raise
        run.stopping = True
        return None  # the loader's workers were stopped with the run: the resumed run validates
    lr, train_loss = weights_lr(run.optimizer), totals.loss / max(totals.images, 1)
    if run.log is not None:
        row = dict(epoch=state.epoch + 1, step=state.step, lr=lr, train_loss=train_loss, loss=val["loss"])
        top5 = val["top5_err"] if val["top5_err"] is not None else math.nan  # "nan" in the CSV: no number
        run.log.val(**row, top1_err=val["top1_err"], top5_err=top5)
    run.say(
        f"epoch {state.epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
        f"top-1 err {percent(val['top1_err'])}, top-5 err {percent(val['top5_err'])}, lr {lr:g}"
    )
    if run.panel is not None:
        log_predictions(run)
    run.scheduler.step(val["top1_err"])
    state.best_val_top1 = min(state.best_val_top1, val["top1_err"])
    state.epoch, state.batch = state.epoch + 1, 0
    save(run)
    return val


def fit(
    placement: Placement,
    model_config: AlexNetConfig,
    data: DataConfig,
    config: TrainConfig,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) a run in `out` on `placement`; returns the last validation metrics and the state.

    Rank 0 claims `out` for the run (`alexnet2gpu.train.rundir`): a fresh run refuses a directory holding
    a checkpoint unless `overwrite`, and no two processes train into one directory at once."""
    claim = RunDir(out, resume=resume, overwrite=overwrite)
    placement.on_rank0(lambda: claim.__enter__() and None)
    try:
        return _fit(placement, model_config, data, config, out, resume, progress, tensorboard)
    finally:
        claim.__exit__()


def _fit(placement, model_config, data, config, out, resume, progress, tensorboard) -> dict:
    run, train_set, val_set = start(
        placement, model_config, data, config, out, resume=resume, progress=progress, tensorboard=tensorboard
    )
    if placement.device.type == "cpu":
        run.say("no CUDA device: training on the CPU (slow; make train-2gpu / train-1gpu use GPUs when present)")
    left = departures(model_config, data, config)
    run.say("recipe: K12's run 145" + (f", except {'; '.join(left)}" if left else " (no departure)"))
    if run.scheduler.describe():
        run.say(run.scheduler.describe())
    state, val = run.state, {}
    resumed_step, resumed_epoch = state.step, state.epoch
    with run.stop:  # until the run's last word: a signal during the save or after it is only counted
        try:
            while state.epoch < config.epochs and not _done(state, config):
                run.stopping = run.stopping or placement.agree(1, bool(run.stop))[1]
                if run.stopping:
                    break
                try:
                    totals = train_one_epoch(run, train_set)
                except RuntimeError as error:  # torch.OutOfMemoryError is one, as the CPU allocator's failure
                    if not _out_of_memory(error):
                        raise
                    raise TrainingError(
                        f"out of memory at step {state.step + 1} (a batch of {config.batch_size} on "
                        f"{run.placement.device}): lower -b; {_last_words(run)}"
                    ) from None
                if totals is not None:
                    val = end_epoch(run, val_set, totals) or val
            if run.saved_step != state.step or run.stopping:
                save(run)
        finally:
            if run.log is not None:
                run.log.close()
        if run.stopping:
            run.say(f"stopped at step {state.step}; saved {run.last}: continue with --resume {run.last}")
    if run.stopping:
        raise KeyboardInterrupt
    checkpoint = run.last
    if resume is not None and state.step == resumed_step and state.epoch == resumed_epoch:  # nothing was left
        if not run.last.exists():  # --out is not the resumed run's folder
            checkpoint = Path(resume)
        why = f"has run its {state.epoch} of {config.epochs} epochs"
        if config.max_steps is not None and config.max_steps <= state.step:
            why = f"is at step {state.step}, --max-steps {config.max_steps}"
        written = "" if run.last.exists() else f"; {run.last} not written"
        run.say(f"nothing to train: {resume} {why}{written}: raise --epochs or --max-steps to go on")
    return {"step": state.step, "epoch": state.epoch, "val": val, "checkpoint": str(checkpoint)}


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
    overwrite: bool = False,
) -> dict:
    """Train (or resume) a run in `out` with both towers in this process, on `devices`."""
    options = dict(resume=resume, progress=progress, tensorboard=tensorboard, overwrite=overwrite)
    return fit(Placement(devices), model_config, data, config, out, **options)
