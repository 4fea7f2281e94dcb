"""PaperSGD's step alone, for AlexNet2GPU's 32 parameters (16 per tower): the foreach step against the per-parameter
loop it replaced (four small kernels per parameter), median of repeated steps, same process.

    python experiments/optim_step.py                     # on the CPU, both towers on it
    python experiments/optim_step.py --devices cuda:0 cuda:1
    python experiments/optim_step.py --narrow            # tests' narrow net: the per-kernel overhead dominates
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alexnet2gpu import AlexNet2GPU, AlexNetConfig
from alexnet2gpu.config import TrainConfig
from alexnet2gpu.train.optim import PaperSGD, param_groups


class LoopSGD(torch.optim.Optimizer):
    """PaperSGD's step before the foreach rewrite."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(momentum).add_(p, alpha=-decay * lr).add_(p.grad, alpha=-lr)
                p.add_(v)


def seconds_per_step(optimizers: dict[str, torch.optim.Optimizer], model: torch.nn.Module, steps: int) -> dict:
    """Median seconds of each optimiser's step, the optimisers taking turns, so that a machine that
    others load slows both alike."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps + 2):  # the first two create the velocities and warm the caches
        for name, optimizer in optimizers.items():
            sync(model)
            start = time.perf_counter()
            optimizer.step()
            sync(model)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def sync(model: torch.nn.Module) -> None:
    for device in {p.device for p in model.parameters() if p.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs=2, default=["cpu", "cpu"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--narrow", action="store_true", help="the narrow net of tests/test_runs.py")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AlexNetConfig(conv_channels=(16, 32, 48, 48, 32), fc_features=(64, 64)) if args.narrow else AlexNetConfig()
    model = AlexNet2GPU(config, devices=args.devices)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {}
    for name, cls in [("loop", LoopSGD), ("foreach", PaperSGD)]:
        groups = param_groups(model, TrainConfig())  # the default bias rule: weights and biases, two groups
        for group in groups:
            group.update(lr=0.01 * group["lr_mult"], weight_decay=5e-4 * group["decay_mult"])
        optimizers[name] = cls(groups, lr=0.01)  # both step the same weights: only the time matters here
    result = seconds_per_step(optimizers, model, args.steps)
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(list(model.parameters()))} parameters, {params / 1e6:.1f} M values on {' '.join(args.devices)}")
    print(
        f"loop {result['loop'] * 1e3:.2f} ms, foreach {result['foreach'] * 1e3:.2f} ms per step, "
        f"ratio loop/foreach {result['loop'] / result['foreach']:.2f}"
    )


if __name__ == "__main__":
    main()
