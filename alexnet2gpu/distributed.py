"""Towers as processes, pairs of towers data-parallel: the mode for more than one workstation.

World of 2 x D ranks on a device mesh (dp=D, tower=2); rank = replica * 2 + tower. Each rank holds
one tower. The paper's exchanges (into conv3, fc6, fc7, fc8) and the logits are all-gathers over
the rank's tower group, as autograd-aware functional collectives (their backward is a
reduce-scatter), on gloo or NCCL alike. Each tower is wrapped in DistributedDataParallel over its
own dp group: the D copies of tower A average their gradients, never with tower B's.

Launch with torchrun (`make train-dist`):
    torchrun --nnodes N --nproc-per-node 2 -m alexnet2gpu train --parallel tower-processes ...
Checkpoints are written in the single-process layout (`tower_a.*`, `tower_b.*`) and load both ways.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.model import AlexNet2GPU, Tower, check_input

TOWERS = ("tower_a", "tower_b")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), the same on both ranks of the pair."""
        check_input(x, self.config)
        t = self.tower
        a = self.gather(t.own_maps(x))  # conv3 reads both towers: (N, 256, 13, 13)
        a = self.gather(t.upper_maps(a))  # fc6: (N, 9216)
        a = self.gather(t.fc(t.fc6, a))  # fc7: (N, 4096)
        a = self.gather(t.fc(t.fc7, a))  # fc8: (N, 4096)
        return self.gather(t.fc8(a))  # (N, 500 + 500)

    def load_from_towers(self, state: dict[str, torch.Tensor]) -> None:
        """Take this tower's weights from an AlexNet2GPU state dict."""
        prefix = TOWERS[self.index] + "."
        self.tower.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def replicated_loss(logits: torch.Tensor, labels: torch.Tensor, towers: int = 2) -> torch.Tensor:
    """Both ranks of a pair hold the same logits and loss, and the all-gathers' backward sums what
    both send back: divided by the tower count, the gradient is the single-process one."""
    return F.cross_entropy(logits, labels) / towers


def dropout_generators(module: TowerProcess, seed: int, step: int, replica: int) -> None:
    """This rank's dropout masks for `step` come from a generator of (seed, step, tower, replica)."""
    module.tower.drop.generators = [
        dropout_generator(seed, step, module.index, replica, module.tower.fc6.weight.device)
    ]


def dropout_generator(seed: int, step: int, tower: int, replica: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 8 + tower) * 65_537 + replica)


def reference_generators(model: AlexNet2GPU, seed: int, step: int, replicas: int) -> None:
    """The same masks in a single-process model whose batch is the replicas' batches end to end."""
    for index, tower in enumerate((model.tower_a, model.tower_b)):
        device = tower.fc6.weight.device
        tower.drop.generators = [dropout_generator(seed, step, index, r, device) for r in range(replicas)]


def mesh_for(world_size: int, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % 2:
        raise ValueError(f"tower processes come in pairs: the world size must be even, not {world_size}")
    return init_device_mesh(device_type, (world_size // 2, 2), mesh_dim_names=("dp", "tower"))


def wrap(module: TowerProcess, mesh) -> nn.Module:
    """DDP over this tower's dp group only (DDP over the world would average A's weights with B's)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [module.tower.fc6.weight.device.index] if module.tower.fc6.weight.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, process_group=mesh.get_group("dp"))


# ---------------------------------------------------------------------------------------------
# a launcher that forks (torch is imported once) for tests and single-machine runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # forked from a process whose thread pool must not be reused
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` forked processes on gloo; raises if one fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_run_rank, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="fork")


# ---------------------------------------------------------------------------------------------
# training: `python -m alexnet2gpu train --parallel tower-processes` under torchrun


def _tower_optimizer_state(state: dict, index: int, n: int) -> dict:
    """Tower `index`'s share of a single-process PaperSGD state dict (tower A's n tensors first)."""
    picked = {i - index * n: v for i, v in state["state"].items() if index * n <= int(i) < (index + 1) * n}
    groups = [{**g, "params": list(range(n))} for g in state["param_groups"]]
    return {"state": picked, "param_groups": groups}


def _merged_optimizer_state(states: list[dict], n: int) -> dict:
    merged = {i + t * n: v for t, s in enumerate(states) for i, v in s["state"].items()}
    groups = [{**g, "params": list(range(2 * n))} for g in states[0]["param_groups"]]
    return {"state": merged, "param_groups": groups}


def train_tower_processes(model_config, data, config, out, *, resume=None, progress: bool = True) -> dict:
    """One rank of a tower-process run; torchrun (or `launch`) starts 2 x D of them."""
    import math
    from pathlib import Path

    from alexnet2gpu import checkpoint as ckpt
    from alexnet2gpu.datasets import batches, num_batches
    from alexnet2gpu.engine import TrainingError, prepare, step_seed
    from alexnet2gpu.optim import PaperSGD
    from alexnet2gpu.transforms import Pipeline

    if not dist.is_initialized() and "RANK" not in os.environ:
        raise ValueError(
            "--parallel tower-processes runs one tower per process: start it with "
            "torchrun --nproc-per-node 2 -m alexnet2gpu train --parallel tower-processes ... (make train-dist)"
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if torch.cuda.is_available() else torch.device("cpu")
    )
    mesh = mesh_for(world, device.type)
    tower, replica, replicas = mesh.get_local_rank("tower"), mesh.get_local_rank("dp"), world // 2
    if config.batch_size % replicas:
        raise ValueError(f"--batch-size {config.batch_size} must split evenly over {replicas} tower pairs")
    say = print if (rank == 0 and progress) else (lambda *_: None)
    train_set, val_set, saved, stats = prepare(model_config, data, config, resume)

    torch.manual_seed(config.seed)  # every rank draws the single-process model's initial weights
    full_state = saved["model"] if saved is not None else AlexNet2GPU(model_config, ("cpu", "cpu")).state_dict()
    module = TowerProcess(model_config, tower, mesh.get_group("tower"), device)
    module.load_from_towers(full_state)
    model = wrap(module, mesh)
    n_params = len(list(module.parameters()))
    optimizer = PaperSGD(module.parameters(), config.lr, config.momentum, config.weight_decay)
    step = epoch = batch = 0
    if saved is not None:
        optimizer.load_state_dict(_tower_optimizer_state(saved["optimizer"], tower, n_params))
        step, epoch, batch = saved["step"], saved["epoch"], saved["batch"]
    train_pipe, val_pipe = Pipeline(data, stats, device, train=True), Pipeline(data, stats, device, train=False)
    last = Path(out) / "last.pt"
    configs = {"model": model_config.to_dict(), "data": data.to_dict(), "train": config.to_dict()}

    def save() -> None:
        """Every rank sends its tower; rank 0 writes the single-process layout."""
        mine = ({k: v.cpu() for k, v in module.tower.state_dict().items()}, optimizer.state_dict())
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if rank == 0:
            model_state = {f"{TOWERS[t]}.{k}": v for t in range(2) for k, v in parts[t][0].items()}
            ckpt.save(
                {
                    "model": model_state,
                    "optimizer": _merged_optimizer_state([parts[0][1], parts[1][1]], n_params),
                    "scheduler": {},
                    "rng": ckpt.rng_state(),
                    "step": step,
                    "epoch": epoch,
                    "batch": batch,
                    "best_val_top1": math.inf,
                    "config": configs,
                    "stats": stats.to_dict() if stats is not None else None,
                },
                last,
            )
        dist.barrier()

    per_replica = config.batch_size // replicas
    done = lambda: config.max_steps is not None and step >= config.max_steps  # noqa: E731
    try:
        while epoch < config.epochs and not done():
            model.train()
            stream = batches(
                train_set, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch, start=batch, drop_last=True
            )
            for images, labels in stream:
                if done():
                    break
                rows = slice(replica * per_replica, (replica + 1) * per_replica)
                generator = torch.Generator().manual_seed(step_seed(config.seed, step) * 16 + replica)
                x, y = train_pipe(images[rows], generator), labels[rows].to(device)
                dropout_generators(module, config.seed, step, replica)
                loss = replicated_loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = 2 * loss.item()
                if not math.isfinite(value):
                    raise TrainingError(f"loss is {value} at step {step + 1} on rank {rank}; stopped without saving")
                optimizer.step()
                step, batch = step + 1, batch + 1
                if step % config.log_every == 0:
                    say(f"step {step} (epoch {epoch + 1}): loss {value:.4f} on rank 0's {per_replica} images")
            else:
                from alexnet2gpu.engine import evaluate

                val = evaluate(model, val_set, val_pipe, batch_size=per_replica, progress=False)
                say(f"epoch {epoch + 1}: val top-1 err {val['top1_err']:.2%}, top-5 err {val['top5_err']:.2%}")
                epoch, batch = epoch + 1, 0
                save()
                continue
        save()
    except KeyboardInterrupt:
        save()
        raise
    n = num_batches(train_set, config.batch_size, drop_last=True)
    return {"step": step, "epoch": epoch, "steps_per_epoch": n, "checkpoint": str(last), "rank": rank}
