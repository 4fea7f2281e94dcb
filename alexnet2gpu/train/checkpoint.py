"""Checkpoints: one dict, written atomically, readable with `torch.load(weights_only=True)`.

{"model": AlexNet2GPU state dict (or the one-tower net's), "optimizer", "scheduler",
 "rng": {"cpu", "cuda"}, "step", "epoch", "batch": batches done in that epoch,
 "config": {"model", "data", "train"}, "stats": the data statistics, "best_val_top1",
 "classes": {"ids", "names"} of the training set, in label order}
"""

from __future__ import annotations

import math
import shutil
import stat
import zipfile
from pathlib import Path

import torch
from torch import nn

from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig, finite
from alexnet2gpu.data.base import Categories
from alexnet2gpu.data.stats import DataStats
from alexnet2gpu.files import atomic_write, what_is

KEYS = ("model", "optimizer", "scheduler", "rng", "step", "epoch", "batch", "config", "best_val_top1")
CONFIGS = {"model": AlexNetConfig, "data": DataConfig, "train": TrainConfig}


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used; the message says why and what to do."""


def record(
    *,
    model: dict,
    optimizer: dict,
    scheduler: dict,
    configs: dict,
    stats: DataStats | None,
    classes: Categories | None,
    rng: dict,
    step: int = 0,
    epoch: int = 0,
    batch: int = 0,
    best_val_top1: float = math.inf,
    **extra,
) -> dict:
    """The checkpoint of the layout above, from its parts: the one builder, for a run's every save and
    for `import-caffe`. `configs` maps "model", "data" and "train" to their configs; `extra` holds a
    run's own entries (its epoch totals, its alarm)."""
    if set(configs) != set(CONFIGS):
        raise ValueError(f"a checkpoint's configs are {', '.join(CONFIGS)}; got {', '.join(configs)}")
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": rng,
        "step": step,
        "epoch": epoch,
        "batch": batch,
        "best_val_top1": best_val_top1,
        **extra,
        "config": {name: configs[name].to_dict() for name in CONFIGS},
        "stats": stats.to_dict() if stats is not None else None,
        "classes": classes.to_dict() if classes is not None else None,  # None: checked by class count only
    }


def save(checkpoint: dict, path: str | Path) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file whole.

    Every tensor is written from a CPU copy, so that the file loads on a machine with fewer GPUs or
    none (`torch.load(path, weights_only=True)`, no map_location needed).

    A disk too small for the checkpoint is refused before writing (torch.save's own error for a
    full disk is an opaque "unexpected pos"); a write that fails anyway removes its partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = to_cpu(checkpoint)
    need = tensor_bytes(checkpoint)
    free = check_room(path, need)
    try:
        with atomic_write(path) as tmp:  # also KeyboardInterrupt / SystemExit: no partial file is left
            torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as error:
        # `free` as measured before the write: measured now, the space the failed write took may not be
        # back yet (its file can stay open through the traceback), and a full disk would read 0
        raise CheckpointError(
            f"cannot write {path} ({_reason(error)}); {_mb(free)} was free on its disk before the write, about "
            f"{_mb(need)} needed; any previous checkpoint there is unchanged"
        ) from None
    return path


def check_room(path: str | Path, need: int, *, replaces: bool = False) -> int:
    """The free bytes on `path`'s disk, or one line when a checkpoint of `need` bytes would not fit.
    A run calls it before its first step too (`replaces`), with the size its checkpoints will have:
    each save writes the new file beside the old one, so a run needs room for two while `path` is
    smaller than `need`. A disk too small is then found before an epoch of training, not after it."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parent.parents) if p.is_dir()), Path("."))
    free = shutil.disk_usage(folder).free
    old = path.stat().st_size if path.is_file() else 0
    total = need + max(0, need - old) if replaces else need
    if total > free:
        two = f" (the new checkpoint is written beside the old one: room for {'two' if not old else 'both'})"
        raise CheckpointError(
            f"cannot write {path}: it needs about {_mb(total)}{two if replaces else ''} and its disk has "
            f"{_mb(free)} free; free some space or point --out at a larger disk"
        )
    return free


def to_cpu(obj):
    """`obj` with every tensor inside nested dicts, lists and tuples as a CPU copy (CPU tensors as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples: a checkpoint's size on disk, near enough."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _reason(error: BaseException) -> str:
    """An exception as "Type: first line of its message", or its type alone when it has no message
    (torch.load of an empty file raises an EOFError without one)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:120]}" if lines else type(error).__name__


def _check_stored(path: Path) -> None:
    """torch.save writes its zip entries stored, never compressed: a compressed entry (which could
    inflate to any size when read) is refused from the zip's directory alone, before anything is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: torch.load's own error says what it is
    if packed:
        raise CheckpointError(
            f"{path} holds compressed entries ({packed[0]}{' ...' if len(packed) > 1 else ''}), which torch.save "
            "never writes: it is not a checkpoint of ours; resume from another one"
        )


def load(path: str | Path, *, mmap: bool = False) -> dict:
    """A checkpoint, checked for the keys every checkpoint has; `mmap` reads tensors only when used."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}; a training run writes RUN_DIR/last.pt") from None
    except OSError as error:  # a loop of symbolic links, a folder on the way that cannot be read
        raise CheckpointError(f"cannot open checkpoint {path}: {error.strerror}; name RUN_DIR/last.pt") from None
    if not stat.S_ISREG(mode):  # a FIFO would hang the read, a device would be read forever
        raise CheckpointError(f"{path} is {what_is(mode)}, not a checkpoint file; name a checkpoint (RUN_DIR/last.pt)")
    if path.stat().st_size == 0:  # torch.load's error for it has no text (or, with mmap, is about mmap)
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes), not a checkpoint: resume from another one or start a new run"
        )
    _check_stored(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {path} ({_reason(error)}); "
            "it may be truncated or not a checkpoint: resume from another one or start a new run"
        ) from None
    missing = [key for key in KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not an alexnet2gpu checkpoint: it lacks {', '.join(missing)}")
    model, data, train = read_configs(checkpoint, path)
    _check_entries(checkpoint, model, data, train, path)
    return checkpoint


def _check_entries(checkpoint: dict, model: AlexNetConfig, data: DataConfig, train: TrainConfig, path: Path) -> None:
    """The entries a resume, evaluate or predict reads, by type and range, before anything is built
    from them: one line naming the entry, not a TypeError or an IndexError later."""

    def refuse(what: str) -> None:
        raise CheckpointError(f"{path}: {what}; it was edited or damaged: use a checkpoint that `train` wrote")

    for key in ("step", "epoch", "batch"):
        value = checkpoint[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            refuse(f"its {key} is {value!r}, not a count of 0 or more")
    best = checkpoint["best_val_top1"]
    if not isinstance(best, (int, float)) or isinstance(best, bool) or not (0 <= best <= 1 or best == math.inf):
        refuse(f"its best_val_top1 is {best!r}, not an error rate")
    if checkpoint["epoch"] > train.epochs:  # a run stops at its epochs: it never saves past them
        refuse(f"its epoch is {checkpoint['epoch']}, past the {train.epochs} epochs of its run")
    rng = checkpoint["rng"]
    cpu = rng.get("cpu") if isinstance(rng, dict) else None
    cuda = rng.get("cuda", []) if isinstance(rng, dict) else None
    if not (
        isinstance(cpu, torch.Tensor)
        and cpu.dtype == torch.uint8
        and cpu.shape == torch.get_rng_state().shape
        and isinstance(cuda, list | tuple)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        refuse("its rng entry is not the generators' saved state")
    said = _widths_problem(checkpoint["model"], model)
    if data.preset != "seed" and checkpoint.get("stats") is None:
        said = said or f"it holds no data statistics (mean image, PCA), which its {data.preset} preset needs"
    if data.crop_size != model.input_size:
        said = said or f"its crops are {data.crop_size} pixels, its network's input {model.input_size}"
    if said:
        refuse(said)
    classes = checkpoint.get("classes")
    if classes is not None:
        ids, names = (classes.get(k) if isinstance(classes, dict) else None for k in ("ids", "names"))
        if not (isinstance(ids, list) and isinstance(names, list) and len(ids) == len(names)):
            refuse("its class list is not a list of ids with a name each")
        if len(ids) != model.num_classes:
            refuse(f"its class list names {len(ids)} classes, its fc8 has {model.num_classes}")
        if not all(isinstance(v, str) for v in (*ids, *names)):
            refuse("its class list holds something other than names")
    stats = checkpoint.get("stats")
    said = DataStats.problem(stats, model.in_channels) if stats is not None else None
    if said:
        refuse(said)


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _optimizer_problem(saved) -> str | None:
    """An optimiser state as `state_dict` gives it: parameter groups of numbers, states of tensors."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and groups and isinstance(state, dict)):
        return "its optimiser entry is not an optimiser's state (parameter groups and their state)"
    for group in groups:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)):
            return "its optimiser has a parameter group that is not one"
        if not all(finite(group[k]) for k in ("lr", "momentum", "weight_decay") if k in group):
            return "its optimiser has a learning rate, momentum or decay that is not a finite number"
    for entry in state.values():
        if not (isinstance(entry, dict) and all(isinstance(v, torch.Tensor) or _number(v) for v in entry.values())):
            return "its optimiser state holds something other than tensors (velocities)"
    return None


def _scheduler_problem(saved) -> str | None:
    """A schedule's state: numbers, words and lists of numbers; `last_epoch` a count."""
    if not isinstance(saved, dict):
        return "its scheduler entry is not a schedule's state"
    plain = (str, bool, type(None))
    for key, value in saved.items():
        listed = isinstance(value, list) and all(finite(x) for x in value)
        if not (finite(value) or isinstance(value, plain) or listed or (value == math.inf or value == -math.inf)):
            return f"its scheduler's {key} is {value!r}"
    if "last_epoch" in saved and not (isinstance(saved["last_epoch"], int) and saved["last_epoch"] >= -1):
        return f"its scheduler's last_epoch is {saved['last_epoch']!r}, not an epoch"
    return None


def _alarm_problem(saved) -> str | None:
    """The loss alarm's memory (absent in older checkpoints and Caffe's imports): losses and warnings given."""
    if saved is None:
        return None
    if not (
        isinstance(saved, dict)
        and all(
            isinstance(saved.get(k, []), list) and all(finite(x) for x in saved.get(k, [])) for k in ("recent", "long")
        )
        and isinstance(saved.get("fired", []), list)
        and all(x in ("diverging", "flat") for x in saved.get("fired", []))
    ):
        return "its alarm entry is not the loss alarm's state (lists of losses, the warnings given)"
    return None


# A config whose network would hold this many parameters more than its weights, and past this size, is
# refused before it is built (an edited num_classes of 10^12 was allocated first); smaller mismatches are
# built and named tensor by tensor by `load_weights`
OVERSIZED = 10, 500_000_000


def _widths_problem(weights, model: AlexNetConfig) -> str | None:
    """A config asking for a network far larger than its weights (both towers' biases give the widths)."""
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        return None  # said by `load_weights`, after the config's own checks
    layers = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    widths = (*model.conv_channels, *model.fc_features, model.num_classes)
    fan_in = (model.in_channels * 121, *(c * k for c, k in zip(model.conv_channels[:4], (25, 9, 9, 9), strict=True)))
    fan_in += (model.conv_channels[4] * 36, *model.fc_features)  # conv1 11x11, conv2 5x5, 3x3 after; fc6 of 6x6 maps
    planned = sum(w * f for w, f in zip(widths, fan_in, strict=True))
    held = sum(t.numel() for t in weights.values())
    if planned > max(OVERSIZED[0] * held, OVERSIZED[1]):
        for layer, width in zip(layers, widths, strict=True):
            found = [t for k, t in weights.items() if k == f"{layer}.bias" or k.endswith(f".{layer}.bias")]
            outputs = sum(t.shape[0] for t in found if t.dim())
            if outputs != width:
                return f"its config gives {layer} {width} outputs, its weights {outputs}"
        return f"its config plans a network of about {planned:,} weights, its weights hold {held:,}"
    return None


def read_configs(checkpoint: dict, path: str | Path) -> tuple[AlexNetConfig, DataConfig, TrainConfig]:
    """The model, data and training configs a checkpoint was written with, or one line on what is wrong."""
    config = checkpoint.get("config")
    parts = config if isinstance(config, dict) else {}
    missing = [name for name in CONFIGS if not isinstance(parts.get(name), dict)]
    if missing:
        raise CheckpointError(
            f"{path}: its config lacks the {', '.join(missing)} part{'s' if len(missing) > 1 else ''} "
            "that this version needs to rebuild the network; use a checkpoint that `train` wrote"
        )
    try:  # a field an older version did not write takes the value that version behaved as (Fields.LEGACY)
        return tuple(cls.from_dict(parts[name]) for name, cls in CONFIGS.items())
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its config cannot be used: {error}") from None


def categories(checkpoint: dict) -> Categories | None:
    """The classes a checkpoint was trained on, in label order (None for one written before they were kept)."""
    saved = checkpoint.get("classes")
    if not isinstance(saved, dict) or not isinstance(saved.get("ids"), list):
        return None
    return Categories.from_dict(saved)


def load_weights(model: nn.Module, state, path: str | Path) -> None:
    """Load a checkpoint's weights into `model`, or raise one line: how many keys are missing,
    unexpected or of another shape (the first few named), or which tensors are not finite."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict of tensors")
    own = model.state_dict()
    mismatch = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "of another shape": [
            f"{k} {tuple(state[k].shape)}, network {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ],
    }
    if any(mismatch.values()):
        said = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:3])})" for what, keys in mismatch.items() if keys)
        raise CheckpointError(f"{path}: its weights do not fit the network ({said}); written for another network?")
    kinds = [f"{k} ({v.dtype})" for k, v in state.items() if own[k].is_floating_point() and not v.is_floating_point()]
    if kinds:  # an int64 conv weight would load truncated, and silently
        raise CheckpointError(f"{path}: {len(kinds)} of its weight tensors are not floating point ({kinds[0]})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path}: NaN or inf in {len(bad)} of its weight tensors ({', '.join(bad[:3])}): the run had diverged "
            "when it was saved; use an earlier checkpoint"
        )
    model.load_state_dict(state)


# What a resumed run may change: each takes effect and is recorded in the next checkpoint. Every other
# option is part of the recipe the run was trained with (the batch, the lr and its schedule, the data
# and its augmentation, the seed) and must stay as the checkpoint has it.
MAY_CHANGE = {
    "data": {"data", "workers", "strict"},
    "train": {"epochs", "max_steps", "val_subset", "amp", "channels_last", "compile", "log_every"}
    | {"devices", "tensorboard"}
    | {"alarm_window", "alarm_after_steps", "alarm_diverge_factor", "alarm_flat_margin", "alarm_flat_epochs"}
    | {"alarm_flat_steps"},
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_resume(checkpoint: dict, configs: dict, path: str | Path) -> None:
    """Refuse to resume the entries only a resume reads (the optimiser's, the schedule's, the alarm's,
    the epoch's sums) when edited or damaged; and to resume with another network, or with options that
    cannot change mid-run, naming every field that differs (the network's first) in one line."""
    said = _optimizer_problem(checkpoint["optimizer"]) or _scheduler_problem(checkpoint["scheduler"])
    said = said or _alarm_problem(checkpoint.get("alarm"))
    totals = checkpoint.get("epoch_totals", [0.0, 0.0, 0.0])
    if not (isinstance(totals, list) and len(totals) == 3 and all(finite(x) and x >= 0 for x in totals)):
        said = said or "its epoch totals are not three sums of 0 or more"
    if said:
        raise CheckpointError(f"{path}: {said}; it was edited or damaged: resume from a checkpoint that `train` wrote")
    saved_model = read_configs(checkpoint, path)[0]
    differ = [
        f"{field}={getattr(saved_model, field)!r} (this run: {getattr(configs['model'], field)!r})"
        for field in saved_model.to_dict()
        if getattr(saved_model, field) != getattr(configs["model"], field)
    ]
    for name, may_change in MAY_CHANGE.items():
        saved, asked = checkpoint["config"].get(name, {}), configs[name].to_dict()
        differ += [
            f"{field}={saved[field]!r} (this run: {asked[field]!r})"
            for field in asked
            if field in saved and field not in may_change and _plain(saved[field]) != _plain(asked[field])
        ]
    if differ:
        raise CheckpointError(
            f"{path} was trained with {', '.join(differ)}, which cannot change on resume; resume without "
            f"those flags, or start a new run (another --out, or --overwrite)"
        )


def rng_state() -> dict:
    """The global generators' states, for the record: a run's draws do not depend on them, since every
    step reseeds from (seed, step) and every epoch's order comes from (seed, epoch)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the CPU state and those of the saved CUDA devices that this machine has: a checkpoint
    written with 8 GPUs visible resumes on 2, on 1 or on none (`set_rng_state_all` would raise)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
