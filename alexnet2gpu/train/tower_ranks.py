"""Towers as processes, pairs of towers data-parallel: the placement for more than one workstation.

World of 2 x D ranks on a device mesh (dp=D, tower=2); rank = replica * 2 + tower. Each rank holds
one tower. The paper's exchanges (into conv3, fc6, fc7, fc8) and the logits are all-gathers over
the rank's tower group, as autograd-aware functional collectives (their backward is a
reduce-scatter), on gloo or NCCL alike. Each tower is wrapped in DistributedDataParallel over its
own dp group: the D copies of tower A average their gradients, never with tower B's.

This module holds the placement (`TowerRanks`: the model, the rows each rank feeds, the loss
scaling, the reductions and the gather/scatter of checkpoint state); the training loop is
`alexnet2gpu.train.loop.fit`, the same one the single-process placement runs.

Launch with torchrun (`make train-dist`):
    torchrun --nnodes N --nproc-per-node 2 -m alexnet2gpu train --parallel tower-processes ...
Checkpoints are written in the single-process layout (`tower_a.*`, `tower_b.*`) and load both ways.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from alexnet2gpu.config import DIST_TIMEOUT, AlexNetConfig
from alexnet2gpu.model.alexnet import TOWERS, AlexNet2GPU
from alexnet2gpu.model.layers import dropout_generator
from alexnet2gpu.model.tower_process import TowerProcess
from alexnet2gpu.train.checkpoint import load_weights, to_cpu
from alexnet2gpu.train.errors import TrainingError
from alexnet2gpu.train.placement import Placement, load_named_optimizer_state, merge_named_states, named_optimizer_state


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


# what gloo and NCCL say when the other end of a collective is gone (a rank killed, a node lost)
PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited")


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

    def __init__(self, mesh, device: torch.device, timeout: float = DIST_TIMEOUT) -> None:
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
            raise self.collective_failed(error) from None
        return torch.stack(every)

    def collective_failed(self, error: RuntimeError) -> Exception:
        """A collective that timed out, or whose peer went away (gloo's "Connection reset/closed by peer",
        a broken pipe), as one line naming the ranks that went silent; any other error as it is."""
        text = str(error).lower()
        timed_out = "timed out" in text or "timeout" in text
        if not timed_out and not any(peer in text for peer in PEER_GONE):
            return error
        silent = silent_ranks(self.world, self.rank, wait=min(30.0, self.timeout * 60) if timed_out else 5.0)
        who = (
            f"rank {', '.join(map(str, silent))} did not answer"
            if silent
            else "the rank holding the rendezvous store did not answer (rank 0 with a fixed MASTER_ADDR)"
            if silent is None
            else "every rank answered the roll call afterwards (a slow rank, or a network fault)"
        )
        if timed_out:
            return TrainingError(
                f"rank {self.rank}: a collective timed out ({self.timeout:g} min, --dist-timeout): {who}; "
                "a stopped (kill -STOP) or hung process, or a lost node; resume from the last checkpoint"
            )
        return TrainingError(
            f"rank {self.rank}: a peer left a collective ({str(error).strip().splitlines()[0][:120]}): {who}; "
            "a killed process (the OOM killer?) or a lost node; resume from the last checkpoint"
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
