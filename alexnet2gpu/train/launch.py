"""Starting tower processes: the torchrun entry of a rank (`train_tower_processes`) and a launcher
that forks ranks on one machine (tests, single-machine runs)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alexnet2gpu.config import DIST_TIMEOUT, AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.train.loop import fit
from alexnet2gpu.train.tower_ranks import TowerRanks, mesh_for


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


def launch(fn: Callable, world_size: int, *args, timeout: float = DIST_TIMEOUT) -> None:
    """Run fn(rank, world_size, *args) in `world_size` forked processes on gloo (collectives time out
    after `timeout` minutes); raises if one fails."""
    port = free_port()
    mp.start_processes(_run_rank, args=(fn, world_size, port, timeout, args), nprocs=world_size, start_method="fork")


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
    timeout: float = DIST_TIMEOUT,
) -> dict:
    """One rank of a tower-process run (torchrun, or `launch`, starts 2 x D of them): the same loop
    and recipe as `loop.train`, on the `TowerRanks` placement. A collective that waits more than
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
        except RuntimeError as error:  # a timeout or a lost peer inside a step (the exchanges, DDP) names the rank
            raise placement.collective_failed(error) from None
        return {**result, "rank": placement.rank}
    finally:
        if started:
            dist.destroy_process_group()
