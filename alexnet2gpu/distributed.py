"""Towers as processes, pairs of towers data-parallel: the placement for more than one workstation.

World of 2 x D ranks on a device mesh (dp=D, tower=2); rank = replica * 2 + tower. Each rank holds
one tower. The paper's exchanges (into conv3, fc6, fc7, fc8) and the logits are all-gathers over
the rank's tower group, as autograd-aware functional collectives (their backward is a
reduce-scatter), on gloo or NCCL alike. Each tower is wrapped in DistributedDataParallel over its
own dp group: the D copies of tower A average their gradients, never with tower B's.

This module holds the placement (`TowerRanks`: the model, the rows each rank feeds, the loss
scaling, the reductions and the gather/scatter of checkpoint state); the training loop is
`alexnet2gpu.engine.fit`, the same one the single-process placement runs.

Launch with torchrun (`make train-dist`):
    torchrun --nnodes N --nproc-per-node 2 -m alexnet2gpu train --parallel tower-processes ...
Checkpoints are written in the single-process layout (`tower_a.*`, `tower_b.*`) and load both ways.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from alexnet2gpu.checkpoint import load_weights, to_cpu
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.engine import TrainingError, fit
from alexnet2gpu.layers import dropout_generator, halo_widths
from alexnet2gpu.model import AlexNet2GPU, Tower, check_input
from alexnet2gpu.placement import (
    Placement,
    load_named_optimizer_state,
    merge_named_states,
    named_optimizer_state,
)

TOWERS = ("tower_a", "tower_b")
DEFAULT_TIMEOUT = 10.0  # minutes a collective waits for a silent rank (gloo's and NCCL's own default: 30)
# all_gather_single_autograd replaces all_gather_tensor_autograd in newer torch; both are differentiable
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


class TowerProcess(nn.Module):
    """Tower `index` of AlexNet2GPU; the other tower lives in the other rank of `group`."""

    def __init__(self, config: AlexNetConfig, index: int, group, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.towers != 2 or not config.fc8_split or config.num_classes % 2:
            raise ValueError("tower processes need two towers with fc8 split evenly (an even num_classes)")
        self.config, self.index, self.group = config, index, group
        self.tower = Tower(config, index, torch.device(device) if device is not None else None)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Both towers' activations, tower A's first: the exchange, as one all-gather each way."""
        both = _all_gather(x.contiguous(), gather_dim=0, group=self.group)  # (2N, ...): A's rows, then B's
        return torch.cat(both.chunk(2), dim=1)  # (N, 2C, ...)

    def lrn_across(self, lrn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """This tower's maps normalised as one LRN over both towers' channels would (`layers.lrn_across`):
        the halo is one all-gather of each tower's edge channels (A's last, B's first; 2 each for size 5)."""
        to_a, to_b = halo_widths(lrn.size)
        h, c = max(to_a, to_b), x.shape[1]
        edge = x[:, c - h :] if self.index == 0 else x[:, :h]  # (N, h, H, W)
        both = _all_gather(edge.contiguous(), gather_dim=0, group=self.group).chunk(2)  # A's tail, B's head
        if self.index == 0:
            return lrn(torch.cat([x, both[1][:, :to_a]], dim=1))[:, :c]
        return lrn(torch.cat([both[0][:, h - to_b :], x], dim=1))[:, to_b:]

    def forward(self, x: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (N, num_classes), the same on both ranks of the pair. `masks`: this tower's fc6 and
        fc7 dropout masks (`Tower.dropout_masks`); drawn here when None."""
        check_input(x, self.config)
        t = self.tower
        m6, m7 = masks or (None, None)
        if self.config.lrn_across:  # CF: LRN1 and LRN2 read the other tower's edge channels
            x = self.lrn_across(t.lrn1, t.conv1_maps(x))  # (N, 48, 55, 55)
            x = t.pool2(self.lrn_across(t.lrn2, t.conv2_maps(x)))  # (N, 128, 13, 13)
        else:
            x = t.own_maps(x)  # (N, 128, 13, 13)
        a = self.gather(x)  # conv3 reads both towers: (N, 256, 13, 13)
        a = self.gather(t.upper_maps(a))  # fc6: (N, 9216)
        a = self.gather(t.fc(t.fc6, a, m6))  # fc7: (N, 4096)
        a = self.gather(t.fc(t.fc7, a, m7))  # fc8: (N, 4096)
        return self.gather(t.fc8(a))  # (N, 500 + 500)

    def load_from_towers(self, state: dict[str, torch.Tensor]) -> None:
        """Take this tower's weights from an AlexNet2GPU state dict."""
        prefix = TOWERS[self.index] + "."
        self.tower.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def replicated_loss(logits: torch.Tensor, labels: torch.Tensor, towers: int = 2) -> torch.Tensor:
    """Both ranks of a pair hold the same logits and loss, and the all-gathers' backward sums what
    both send back: divided by the tower count, the gradient is the single-process one."""
    return F.cross_entropy(logits, labels) / towers


def mesh_for(world_size: int, device_type: str):
    if world_size % 2:
        raise ValueError(f"tower processes come in pairs: the world size must be even, not {world_size}")
    return init_device_mesh(device_type, (world_size // 2, 2), mesh_dim_names=("dp", "tower"))


def wrap(module: TowerProcess, mesh) -> nn.Module:
    """DDP over this tower's dp group only (DDP over the world would average A's weights with B's)."""
    ids = [module.tower.fc6.weight.device.index] if module.tower.fc6.weight.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, process_group=mesh.get_group("dp"))


# ---------------------------------------------------------------------------------------------
# a launcher that forks (torch is imported once) for tests and single-machine runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, fn: Callable, world_size: int, port: int, timeout: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # forked from a process whose thread pool must not be reused
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run fn(rank, world_size, *args) in `world_size` forked processes on gloo (collectives time out
    after `timeout` minutes); raises if one fails."""
    port = free_port()
    mp.start_processes(_run_rank, args=(fn, world_size, port, timeout, args), nprocs=world_size, start_method="fork")


def silent_ranks(world: int, rank: int, wait: float) -> list[int] | None:
    """After a collective timed out: the ranks that do not answer a roll call on the rendezvous store
    within `wait` seconds (a rank stopped or hung answers nothing); None when the store is gone too.
    Every rank that timed out calls it, at about the same time, since they waited on the same collective."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait))
        store.set(f"alexnet2gpu/roll-call/{rank}", "here")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(world) if not store.check([f"alexnet2gpu/roll-call/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store's host may be the silent one
        return None


# ---------------------------------------------------------------------------------------------
# the placement the training loop runs on: `python -m alexnet2gpu train --parallel tower-processes`


class TowerRanks(Placement):
    """This rank's tower; its partner in the pair holds the other, and the pairs are replicas."""

    copies = 2  # both ranks of a pair hold the same loss and error counts
    loss_scale = 0.5  # see replicated_loss

    def __init__(self, mesh, device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__((device, device))
        self.timeout = timeout
        self.mesh = mesh
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tower, self.replica = mesh.get_local_rank("tower"), mesh.get_local_rank("dp")
        self.replicas = self.world // 2
        # host numbers (row counts, stop flags, logged sums) travel on gloo: an NCCL collective would
        # put them on the device and read them back, a wait on the device at every step
        self.host = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def build(self, config: AlexNetConfig) -> nn.Module:
        """This rank's tower of the single-process model's initial weights (every rank draws them all)."""
        full = AlexNet2GPU(config, ("cpu", "cpu")).state_dict()
        self.module = TowerProcess(config, self.tower, self.mesh.get_group("tower"), self.devices[0])
        self.module.load_from_towers(full)
        return self.module

    def checkpoint_bytes(self) -> int:
        return 2 * super().checkpoint_bytes()  # this rank holds one of the two (equal) towers

    def runner(self, channels_last: bool, compile: bool) -> nn.Module:
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        model = wrap(self.module, self.mesh)
        return torch.compile(model) if compile else model

    def names(self) -> dict[nn.Parameter, str]:
        prefix = TOWERS[self.tower]
        return {p: f"{prefix}.{name}" for name, p in self.module.tower.named_parameters()}

    def shard(self, n: int) -> slice:
        """Both ranks of a pair feed the same rows: the replica's equal part of the global batch."""
        part = n // self.replicas
        return slice(self.replica * part, (self.replica + 1) * part)

    def dropout_masks(self, seed: int, step: int, rows: slice, total: int):
        tower = self.module.tower
        return tower.dropout_masks(dropout_generator(seed, step, self.tower, tower.fc6.weight.device), rows, total)

    def agree(self, rows: int, stop: bool) -> tuple[bool, bool]:
        every = self.gather(torch.tensor([float(rows), float(stop)], dtype=torch.float64))  # (world, 2)
        return bool(every[:, 0].all()), bool(every[:, 1].any())

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """(world, k): every rank's host `values`, over the host (gloo) group: no device involved. A rank
        that does not answer within the collective timeout ends the run, named."""
        every = [torch.zeros_like(values) for _ in range(self.world)]
        try:
            dist.all_gather(every, values, group=self.host)
        except RuntimeError as error:
            raise self.timed_out(error) from None
        return torch.stack(every)

    def timed_out(self, error: RuntimeError) -> Exception:
        """A collective's timeout as one line naming the ranks that went silent (any other error as it is)."""
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            return error
        silent = silent_ranks(self.world, self.rank, wait=min(30.0, self.timeout * 60))
        who = (
            f"rank {', '.join(map(str, silent))} did not answer"
            if silent
            else "the rank holding the rendezvous store did not answer (rank 0 with a fixed MASTER_ADDR)"
            if silent is None
            else "every rank answered the roll call afterwards (a slow rank, or a network fault)"
        )
        return TrainingError(
            f"rank {self.rank}: a collective timed out ({self.timeout:g} min, --dist-timeout): {who}; "
            "a stopped (kill -STOP) or hung process, or a lost node; resume from the last checkpoint"
        )

    def sum_replicas(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.devices[0])
        dist.all_reduce(values, group=self.mesh.get_group("dp"))
        return values.cpu()

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def _pair_to_rank0(self, mine) -> list | None:
        """Both towers' objects of replica 0 (the replicas hold the same weights) on rank 0."""
        if self.replica != 0:
            return None
        parts = [None, None] if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0, group=self.mesh.get_group("tower"))
        return parts

    def model_state(self) -> dict[str, torch.Tensor] | None:
        parts = self._pair_to_rank0(to_cpu(self.module.tower.state_dict()))
        if self.rank != 0:
            return None
        return {f"{TOWERS[t]}.{k}": v for t in range(2) for k, v in parts[t].items()}

    def load_model_state(self, state: dict[str, torch.Tensor], path: str) -> None:
        prefix = TOWERS[self.tower] + "."
        load_weights(
            self.module.tower, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, path
        )

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        parts = self._pair_to_rank0(to_cpu(named_optimizer_state(optimizer, self.names())))
        return merge_named_states(parts) if self.rank == 0 else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict, path: str) -> None:
        load_named_optimizer_state(optimizer, state, self.names(), path)


def train_tower_processes(
    model_config: AlexNetConfig,
    data: DataConfig,
    config: TrainConfig,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    overwrite: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict:
    """One rank of a tower-process run (torchrun, or `launch`, starts 2 x D of them): the same loop
    and recipe as `engine.train`, on the `TowerRanks` placement. A collective that waits more than
    `timeout` minutes for a rank ends the run, naming the rank. The process group this function
    starts, it also ends (`destroy_process_group`), on every exit."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise ValueError(
            "--parallel tower-processes runs one tower per process: start it with "
            "torchrun --nproc-per-node 2 -m alexnet2gpu train --parallel tower-processes ... (make train-dist)"
        )
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    started = not dist.is_initialized()
    if started:
        if cuda:  # NCCL by the book: this rank's GPU set, and named to the process group
            torch.cuda.set_device(device)
        backend, device_id = ("nccl", device) if cuda else ("gloo", None)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout), device_id=device_id)
    try:
        world = dist.get_world_size()
        mesh = mesh_for(world, "cuda" if cuda else "cpu")
        if config.batch_size % (world // 2):
            raise ValueError(f"--batch-size {config.batch_size} must split evenly over {world // 2} tower pairs")
        placement = TowerRanks(mesh, device, timeout)
        options = dict(resume=resume, progress=progress, tensorboard=tensorboard, overwrite=overwrite)
        try:
            result = fit(placement, model_config, data, config, out, **options)
        except RuntimeError as error:  # a timeout inside a step (the towers' exchanges, DDP) names the rank too
            raise placement.timed_out(error) from None
        return {**result, "rank": placement.rank}
    finally:
        if started:
            dist.destroy_process_group()
