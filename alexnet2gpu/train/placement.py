"""Where the towers run, as the training loop sees it: everything that differs between placements.

`Placement` is the single process: both towers on their devices (`AlexNet2GPU`, `make train-2gpu`
and `make train-1gpu`) or a one-tower net. `alexnet2gpu.train.tower_ranks.TowerRanks` is one tower per
process with pairs of towers data-parallel (`make train-dist`). The loop in `alexnet2gpu.train.loop`
asks a placement for:

- the model: what the optimiser updates (`module`) and what the batch goes through (`runner`);
- the rows of each global batch this process feeds (`shard`) and the loss scaling (`loss_scale`);
- the dropout masks of a step (`dropout_masks`), drawn per tower for the whole global batch, so that
  they do not depend on how the batch is split over processes;
- numbers agreed over processes: on the host at every step (`agree`: rows to train on, a stop asked),
  and at logging steps and epoch ends (`gather`, `sum_replicas`, `broadcast`);
- checkpoint state in the single-process layout (`model_state`, `optimizer_state`) and back.

The order of the loop's calls (`loop.train`), so a new placement knows when each member runs:

    on_rank0(claim the run directory), on_rank0(read checkpoint), on_rank0(fit statistics)
    build -> checkpoint_bytes -> on_rank0(check disk room) -> load_model_state, load_optimizer_state
          (on resume) -> runner -> writer (whether this process logs and saves)
    per epoch:   `replica` of `replicas` picks the share of the images this pair trains on
      per step:  agree(rows, stop) -> shard(n).start -> dropout_masks -> forward, loss * loss_scale
      logging:   gather(losses and errors of the steps since the last log) / copies
    epoch end:   evaluate: sum_replicas(loss, top-1, top-5) over replicas
                 gather(weights finite?) -> model_state, optimizer_state -> (writer) save -> barrier

`on_rank0` runs a step on rank 0 alone and hands every process its result or its error (`broadcast`).
"""

from __future__ import annotations

import torch
from torch import nn

from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.model.alexnet import AlexNet2GPU, build_model
from alexnet2gpu.model.layers import dropout_generator
from alexnet2gpu.train.checkpoint import CheckpointError, load_weights


class Placement:
    """Both towers (or the one-tower net) in this process."""

    rank, world, replica, replicas = 0, 1, 0, 1
    copies = 1  # processes that hold the same numbers (both towers of a pair do)
    loss_scale = 1.0

    def __init__(self, devices: tuple[torch.device, torch.device]) -> None:
        self.devices = devices
        self.module: nn.Module | None = None

    @property
    def writer(self) -> bool:
        """Whether this process writes logs, progress and checkpoints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where input batches go (tower A's device) and the logits come back."""
        return next(self.module.parameters()).device

    def build(self, config: AlexNetConfig) -> nn.Module:
        """The model, its weights drawn from the global generator (the caller seeds it)."""
        self.module = build_model(config, self.devices)
        return self.module

    def checkpoint_bytes(self) -> int:
        """About the size of this run's checkpoints: both towers' weights and their velocities."""
        return 2 * sum(p.numel() * p.element_size() for p in self.module.parameters())

    def runner(self, channels_last: bool, compile: bool) -> nn.Module:
        """What a batch goes through: the module, in channels-last memory and compiled if asked."""
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        return torch.compile(self.module) if compile else self.module

    def names(self) -> dict[nn.Parameter, str]:
        """Each parameter's key in the single-process state dict."""
        return {p: name for name, p in self.module.named_parameters()}

    def shard(self, n: int) -> slice:
        """The rows of a global batch of `n` that this process feeds."""
        return slice(0, n)

    def dropout_masks(self, seed: int, step: int, rows: slice, total: int):
        """This step's masks, per tower for the global batch of `total`, this process taking `rows`:
        the model's `masks` argument (None for the one-tower net, which draws its own)."""
        if not isinstance(self.module, AlexNet2GPU):
            return None
        towers = (self.module.tower_a, self.module.tower_b)
        return tuple(
            tower.dropout_masks(dropout_generator(seed, step, index, tower.fc6.weight.device), rows, total)
            for index, tower in enumerate(towers)
        )

    def agree(self, rows: int, stop: bool) -> tuple[bool, bool]:
        """(every process has rows to train on, some process asks to stop), agreed on the host at every
        step: plain Python here, no tensor and no wait on the device."""
        return rows > 0, stop

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """(world, k): every process's `values` (k floats), the same on every process."""
        return values[None]

    def sum_replicas(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the data-parallel replicas."""
        return values

    def broadcast(self, obj):
        """Rank 0's `obj` on every process."""
        return obj

    def on_rank0(self, fn):
        """`fn()` run on rank 0 alone; its result, or the error it raised, on every process (so that
        an error there ends every process with the same message instead of leaving them waiting)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as caught:  # noqa: BLE001 - re-raised on every process below
                error = caught
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        pass

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The single-process state dict (on the writer; None elsewhere)."""
        return self.module.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor], path: str) -> None:
        load_weights(self.module, state, path)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimiser's state keyed by parameter name (on the writer; None elsewhere)."""
        return named_optimizer_state(optimizer, self.names())

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict, path: str) -> None:
        load_named_optimizer_state(optimizer, state, self.names(), path)


# ---------------------------------------------------------------------------------------------
# Optimiser state by parameter name: the one layout that every placement saves and loads. (An
# optimiser's own state_dict numbers parameters in its order, which differs between one process
# holding both towers and a process holding one.)


def _ordered(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict:
    state = optimizer.state_dict()
    by_index = [names[p] for p in _ordered(optimizer)]
    return {
        "state": {by_index[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def merge_named_states(parts: list[dict]) -> dict:
    """One named optimiser state from the towers' (each holding its own parameters), group by group."""
    groups = []
    for same in zip(*(part["param_groups"] for part in parts), strict=True):
        groups.append({**same[0], "params": [name for g in same for name in g["params"]]})
    return {"state": {k: v for part in parts for k, v in part["state"].items()}, "param_groups": groups}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: dict, names: dict[nn.Parameter, str], path: str
) -> None:
    """Load a named state (or a single-process state dict numbered by index, as older checkpoints)."""
    ours = optimizer.state_dict()
    if (
        saved["param_groups"]
        and saved["param_groups"][0]["params"]
        and isinstance(saved["param_groups"][0]["params"][0], int)
    ):
        optimizer.load_state_dict(saved)
        return
    if len(saved["param_groups"]) != len(ours["param_groups"]):
        raise CheckpointError(
            f"{path}: its optimiser has {len(saved['param_groups'])} parameter groups, this run's has "
            f"{len(ours['param_groups'])} (another --bias-rule?); resume with the options it was trained with"
        )
    index = {names[p]: i for i, p in enumerate(_ordered(optimizer))}
    groups = []
    for g_saved, g_ours in zip(saved["param_groups"], ours["param_groups"], strict=True):
        missing = [by for by in (n for n, i in index.items() if i in g_ours["params"]) if by not in g_saved["params"]]
        if missing:
            raise CheckpointError(f"{path}: its optimiser state lacks {len(missing)} parameters, e.g. {missing[0]}")
        groups.append({**g_saved, "params": g_ours["params"]})
    state = {index[name]: value for name, value in saved["state"].items() if name in index}
    params = _ordered(optimizer)
    for i, value in state.items():  # a velocity of another shape would fail, or broadcast, at the first step
        wrong = [
            f"{key} {tuple(t.shape)}"
            for key, t in (value.items() if isinstance(value, dict) else [])
            if isinstance(t, torch.Tensor) and t.dim() and t.shape != params[i].shape
        ]
        if not isinstance(value, dict) or wrong:
            name = next(n for n, j in index.items() if j == i)
            raise CheckpointError(
                f"{path}: its optimiser state for {name} is {', '.join(wrong) or repr(type(value).__name__)}, "
                f"the parameter {tuple(params[i].shape)}; it was edited or damaged: resume from another checkpoint"
            )
    optimizer.load_state_dict({"state": state, "param_groups": groups})
