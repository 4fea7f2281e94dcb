"""The bias rule: P 5's one rule for all, or cuda-convnet's biases at 2x lr without weight decay,
in both optimisers, through the lr schedule and across resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU
from torch import nn

import alexnet2gpu.train.loop as loop
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.optim import PaperSGD, make_optimizer, make_scheduler, set_lr

LR, WD, MOMENTUM = 0.1, 0.01, 0.9


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))


def config(optimizer: str, rule: str, **overrides) -> TrainConfig:
    # the two groups of the bias rule under the plateau schedule (the 2012 one's groups per layer: test_schedule)
    fields = dict(lr=LR, weight_decay=WD, momentum=MOMENTUM, optimizer=optimizer, bias_rule=rule, schedule="plateau")
    return TrainConfig(**{**fields, **overrides})


@pytest.mark.parametrize("optimizer", ["paper", "sgd"])
@pytest.mark.parametrize("rule", ["paper", "convnet"])
def test_one_step_by_hand(optimizer: str, rule: str) -> None:
    model = tiny()
    opt = make_optimizer(model, config(optimizer, rule))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    opt.step()
    for name, p in model.named_parameters():
        bias = name.endswith(".bias")
        lr = 2 * LR if bias and rule == "convnet" else LR  # cuda-convnet epsB = 2 epsW
        wd = 0.0 if bias and rule == "convnet" else WD  # wc on weights only
        # P 5 from zero velocity: v = -wd lr w - lr g; torch's SGD: w - lr (g + wd w), the same step
        expected = before[name] - wd * lr * before[name] - lr * grads[name]
        assert torch.allclose(p.detach(), expected, atol=1e-7), name


def test_convnet_groups_put_the_weights_first_and_keep_the_ratio_under_set_lr() -> None:
    model = tiny()
    opt = make_optimizer(model, config("paper", "convnet"))
    weights, biases = opt.param_groups
    assert all(p.ndim == 2 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert (weights["lr"], biases["lr"], weights["weight_decay"], biases["weight_decay"]) == (LR, 2 * LR, WD, 0.0)
    set_lr(opt, 0.03)  # the warm-up's way to set the lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.03, 0.06])
    paper = make_optimizer(model, config("paper", "paper"))
    assert len(paper.param_groups) == 1 and len(paper.param_groups[0]["params"]) == 4


def test_each_lr_drop_keeps_the_bias_group_at_twice_the_weights() -> None:
    opt = make_optimizer(tiny(), config("paper", "convnet", lr_patience=0))
    scheduler = make_scheduler(opt, config("paper", "convnet", lr_patience=0))
    history = []
    for _ in range(7):
        scheduler.step(0.5)  # the validation error never improves
        history.append([g["lr"] for g in opt.param_groups])
    # three drops in all; the bias group's own floor lets its last drop through
    assert history[-1] == pytest.approx([LR * 1e-3, 2 * LR * 1e-3])
    assert history[2] == pytest.approx([LR * 1e-2, 2 * LR * 1e-2])


def test_a_run_resumes_with_its_groups(tmp_path: Path) -> None:
    model = AlexNetConfig(num_classes=10, init="caffe")
    data = DataConfig(dataset="fake", preset="seed", subset=16)
    kwargs = dict(
        schedule="plateau",
        epochs=3,
        batch_size=8,
        val_subset=8,
        seed=3,
        log_every=1,
        bias_rule="convnet",
        warmup_steps=2,
    )
    out = tmp_path / "run"
    loop.train(model, data, TrainConfig(max_steps=1, **kwargs), CPU, out, progress=False, tensorboard=False)
    saved = ckpt.load(out / "last.pt")["optimizer"]["param_groups"]
    assert [(g["name"], g["lr_mult"], g["weight_decay"]) for g in saved] == [
        ("weights", 1.0, 5e-4),
        ("biases", 2.0, 0.0),
    ]
    assert [g["lr"] for g in saved] == pytest.approx([0.005, 0.01])  # step 1 of a 2-step warm-up
    loop.train(
        model,
        data,
        TrainConfig(max_steps=3, **kwargs),
        CPU,
        out,
        resume=out / "last.pt",
        progress=False,
        tensorboard=False,
    )
    again = ckpt.load(out / "last.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in again] == pytest.approx([0.01, 0.02])


def test_a_resume_under_another_bias_rule_is_refused(tmp_path: Path) -> None:
    model = AlexNetConfig(num_classes=10, init="caffe")
    data = DataConfig(dataset="fake", preset="seed", subset=16)
    kwargs = dict(schedule="plateau", epochs=3, batch_size=8, val_subset=8, seed=3, log_every=1, max_steps=1)
    out = tmp_path / "run"
    loop.train(model, data, TrainConfig(bias_rule="paper", **kwargs), CPU, out, progress=False, tensorboard=False)
    with pytest.raises(ckpt.CheckpointError, match=r"bias_rule='paper' \(this run: 'convnet'\), which cannot change"):
        loop.train(
            model, data, TrainConfig(bias_rule="convnet", **kwargs), CPU, out, resume=out / "last.pt", progress=False
        )


def test_a_checkpoint_from_before_the_bias_rule_resumes_as_one_rule(tmp_path: Path) -> None:
    flags = ["--dataset", "fake", "--preset", "seed", "--init", "he", "--net", "one-gpu", "--devices", "cpu"]
    flags += ["-b", "4", "--subset", "8", "--val-subset", "4", "--no-tensorboard", "--bias-rule", "paper"]
    cli = [sys.executable, "-m", "alexnet2gpu", "train"]
    assert subprocess.run([*cli, *flags, "--max-steps", "1", "--out", "run"], cwd=tmp_path).returncode == 0
    old = ckpt.load(tmp_path / "run" / "last.pt")
    del old["config"]["train"]["bias_rule"]  # as written before the field existed
    torch.save(old, tmp_path / "run" / "last.pt")
    resumed = subprocess.run([*cli, "--resume", "run/last.pt", "--max-steps", "2"], cwd=tmp_path, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    saved = ckpt.load(tmp_path / "run" / "last.pt")
    assert saved["step"] == 2 and saved["config"]["train"]["bias_rule"] == "paper"


# ---------------------------------------------------------------------------------------------
# the foreach step is the per-parameter loop, bit for bit


sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
from optim_step import LoopSGD  # noqa: E402 - PaperSGD's step as first written, the reference (one copy)


def mixed_params(seed: int, device: str = "cpu") -> list[nn.Parameter]:
    """Shapes of a conv net's weights and biases, in float32 and float64 mixed within a group."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 5, 5), (8,), (16, 8, 3, 3), (16,), (10, 64), (10,), (7,), (3, 3, 3)]
    dtypes = [torch.float32, torch.float64] * 4
    params = [torch.randn(s, generator=g, dtype=d).to(device) for s, d in zip(shapes, dtypes, strict=True)]
    return [nn.Parameter(p) for p in params]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=[pytest.mark.gpu, CUDA])])
def test_the_foreach_step_is_bit_equal_to_the_loop(device: str) -> None:
    ours, reference = mixed_params(0, device), mixed_params(0, device)

    def groups(params):  # two groups with their own lr and decay, each mixing dtypes
        return [
            dict(params=params[:5], lr=0.03, weight_decay=5e-4),
            dict(params=params[5:], lr=0.07, weight_decay=0.0, momentum=0.5),
        ]

    opt, ref = PaperSGD(groups(ours), lr=0.01, momentum=0.9), LoopSGD(groups(reference), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        without = {step % 8, 6}  # some parameters get no gradient, which ones changes from step to step
        for k, (p, q) in enumerate(zip(ours, reference, strict=True)):
            grad = None if k in without else torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        if step == 3:  # an lr drop between steps
            for o in (opt, ref):
                o.param_groups[0]["lr"] /= 10
        opt.step()
        ref.step()
        for p, q in zip(ours, reference, strict=True):
            assert p.dtype == q.dtype and torch.equal(p, q)
            assert (p in opt.state) == (q in ref.state)
            if p in opt.state:
                assert torch.equal(opt.state[p]["velocity"], ref.state[q]["velocity"])
    assert 6 not in [k for k, p in enumerate(ours) if p in opt.state]  # never had a gradient: no velocity
    # the checkpoint layout is the loop's: the same keys, one "velocity" per stepped parameter
    saved, expected = opt.state_dict(), ref.state_dict()
    assert saved["state"].keys() == expected["state"].keys()
    assert all(list(s) == ["velocity"] for s in saved["state"].values())
    assert saved["param_groups"] == expected["param_groups"]


@pytest.mark.parametrize(
    ("scaling", "batch", "lr"), [("none", 256, LR), ("linear", 256, 2 * LR), ("linear", 64, LR / 2)]
)
def test_the_linear_rule_scales_the_lr_with_the_global_batch(scaling: str, batch: int, lr: float) -> None:
    """Goyal et al. 2017: --lr is a batch of 128's; -b 256 (two pairs of 128) doubles it, in every group,
    in the warm-up and in the schedule's floor."""
    cfg = config("paper", "convnet", batch_size=batch, lr_scaling=scaling, warmup_steps=4)
    assert cfg.base_lr == pytest.approx(lr)
    opt = make_optimizer(tiny(), cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, 2 * lr])
    set_lr(opt, cfg.base_lr * 1 / 4)  # the warm-up's first step, as loop.train_step sets it
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr / 4, lr / 2])
    assert make_scheduler(opt, cfg).min_lrs == pytest.approx([lr * 1e-3, 2 * lr * 1e-3])
