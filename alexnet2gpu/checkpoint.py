"""Checkpoints: one dict, written atomically, readable with `torch.load(weights_only=True)`.

{"model": AlexNet2GPU state dict (or the one-tower net's), "optimizer", "scheduler",
 "rng": {"cpu", "cuda"}, "step", "epoch", "batch": batches done in that epoch,
 "config": {"model", "data", "train"}, "stats": the data statistics, "best_val_top1"}
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from alexnet2gpu.config import AlexNetConfig

KEYS = ("model", "optimizer", "step", "epoch", "batch", "config")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used; the message says why and what to do."""


def save(checkpoint: dict, path: str | Path) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file whole.

    A disk too small for the checkpoint is refused before writing (torch.save's own error for a
    full disk is an opaque "unexpected pos"); a write that fails anyway removes its partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    need = tensor_bytes(checkpoint)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise CheckpointError(
            f"cannot write {path}: it needs about {_mb(need)} and its disk has {_mb(free)} free; "
            "free some space or point --out at a larger disk"
        )
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException as error:  # also KeyboardInterrupt / SystemExit: no partial file is left
        tmp.unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"cannot write {path} ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
            f"{_mb(free)} free on its disk, about {_mb(need)} needed; any previous checkpoint there is unchanged"
        ) from None
    return path


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


def load(path: str | Path, *, mmap: bool = False) -> dict:
    """A checkpoint, checked for the keys every checkpoint has; `mmap` reads tensors only when used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; a training run writes RUN_DIR/last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
            "it may be truncated or not a checkpoint: resume from another one or start a new run"
        ) from None
    missing = [key for key in KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not an alexnet2gpu checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def check_compatible(checkpoint: dict, config: AlexNetConfig, path: str | Path) -> None:
    """Refuse a checkpoint whose network differs from the one asked for, naming the fields."""
    saved = AlexNetConfig.from_dict(checkpoint["config"]["model"])
    differ = [
        f"{field}={getattr(saved, field)!r} (asked: {getattr(config, field)!r})"
        for field in saved.to_dict()
        if getattr(saved, field) != getattr(config, field)
    ]
    if differ:
        raise CheckpointError(
            f"{path} holds another network: {', '.join(differ)}; use the dataset and options it was trained with"
        )


# What a resumed run may change: each takes effect and is recorded in the next checkpoint. Every other
# option is part of the recipe the run was trained with (the batch, the lr and its schedule, the data
# and its augmentation, the seed) and must stay as the checkpoint has it.
MAY_CHANGE = {
    "data": {"data", "workers", "strict"},
    "train": {"epochs", "max_steps", "val_subset", "amp", "channels_last", "compile", "log_every"},
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_resume(checkpoint: dict, configs: dict, path: str | Path) -> None:
    """Refuse to resume with another network, or with options that cannot change mid-run (naming them)."""
    check_compatible(checkpoint, configs["model"], path)
    for name, may_change in MAY_CHANGE.items():
        saved, asked = checkpoint["config"].get(name, {}), configs[name].to_dict()
        differ = [
            f"{field}={saved[field]!r} (asked: {asked[field]!r})"
            for field in asked
            if field in saved and field not in may_change and _plain(saved[field]) != _plain(asked[field])
        ]
        if differ:
            raise CheckpointError(
                f"{path} was trained with {', '.join(differ)}, which cannot change on resume; resume without "
                f"those flags, or start a new run (another --out, or --overwrite)"
            )


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """`model.load_state_dict(state)`, with a mismatch reported as one line naming the keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).split("\n\t")[1:3]
        raise CheckpointError(f"{path}: its weights do not fit this network ({'; '.join(first)[:240]})") from None
