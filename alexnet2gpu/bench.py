"""Benchmarks: ratios measured within one run, interleaved, never in tests.

`python -m alexnet2gpu bench --data`: images/s of the paper's batched train pipeline against the
seed's per-sample torchvision transforms, on the same images.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from alexnet2gpu.config import DataConfig
from alexnet2gpu.datasets import InMemory, batches, build_dataset
from alexnet2gpu.stats import fit_stats
from alexnet2gpu.transforms import Pipeline


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PerSample(torch.utils.data.Dataset):
    """The seed's way: one PIL image at a time through torchvision transforms."""

    def __init__(self, dataset: InMemory, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.dataset.images[i, 0].numpy())), int(self.dataset.labels[i])


def seed_loader(dataset: InMemory, batch_size: int) -> torch.utils.data.DataLoader:
    from torchvision import transforms

    seed = transforms.Compose(
        [transforms.Resize(224), transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )  # the seed's transforms, applied image by image
    return torch.utils.data.DataLoader(_PerSample(dataset, seed), batch_size=batch_size, shuffle=True)


def bench_data(
    *,
    dataset: str = "fashion-mnist",
    data: str | None = None,
    device: str = "cpu",
    images: int = 3000,
    repeats: int = 5,
) -> dict:
    """images/s of both pipelines on `images` training images, `repeats` interleaved rounds."""
    dev = torch.device(device)
    train = build_dataset(dataset, "train", data)
    if not isinstance(train, InMemory) or train.channels != 1:
        raise ValueError("the data bench compares against the seed's grayscale pipeline: use mnist or fashion-mnist")
    train = train.subset(min(images, len(train)))
    paper = Pipeline(DataConfig(dataset=dataset), fit_stats(train), dev, train=True)
    generator = torch.Generator().manual_seed(0)

    def run_paper() -> int:
        n = 0
        for x, y in batches(train, 128, shuffle=True):
            paper(x, generator)
            y.to(dev)
            n += len(y)
        _sync(dev)
        return n

    def run_seed() -> int:
        n = 0
        for x, y in seed_loader(train, 60):
            x.to(dev), y.to(dev)
            n += len(y)
        _sync(dev)
        return n

    rates: dict[str, list[float]] = {"paper_batched": [], "seed_per_sample": []}
    run_paper()  # warm-up
    for _ in range(repeats):
        for name, run in (("paper_batched", run_paper), ("seed_per_sample", run_seed)):
            start = time.perf_counter()
            n = run()
            rates[name].append(n / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "machine": machine(),
        "device": str(dev),
        "dataset": dataset,
        "images": len(train),
        "img_per_s": {name: round(v) for name, v in medians.items()},
        "spread": {name: [round(min(r)), round(max(r))] for name, r in rates.items()},
        "ratio_paper_vs_seed": round(medians["paper_batched"] / medians["seed_per_sample"], 2),
    }


def print_data_table(result: dict) -> None:
    print(f"data pipeline, {result['dataset']} ({result['images']} images), {result['device']}; {result['machine']}")
    print(f"{'pipeline':<18} {'img/s (median)':>15} {'min-max':>16}")
    for name, rate in result["img_per_s"].items():
        low, high = result["spread"][name]
        print(f"{name:<18} {rate:>15,} {f'{low:,}-{high:,}':>16}")
    print(f"batched paper pipeline / seed's per-sample pipeline: {result['ratio_paper_vs_seed']:.2f}x")


def main_data(args) -> None:
    result = bench_data(dataset=args.dataset, data=args.data_dir, device=args.device or "cpu", images=args.images)
    print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_data_table(result)


# ---------------------------------------------------------------------------------------------
# models: a training step and inference, every model timed in the same rounds


def _models(device: torch.device) -> dict[str, tuple[torch.nn.Module, int]]:
    """name -> (model, input channels). one_tower_mnist is one full-width tower without LRN, padded to
    227 and with P's three fc layers (the earlier seed preset, not the seed's exact network);
    towers_nn_lrn is the towers with PyTorch's LRN instead of alexnet2gpu.lrn."""
    import torchvision

    from alexnet2gpu.config import AlexNetConfig
    from alexnet2gpu.layers import LocalResponseNorm
    from alexnet2gpu.model import AlexNet2GPU, AlexNetFused

    torch.manual_seed(0)
    one_tower_mnist = AlexNetConfig(towers=1, lrn=False, in_channels=1, num_classes=10)
    reference_lrn = AlexNet2GPU(AlexNetConfig(), (device, device))
    for module in reference_lrn.modules():
        if isinstance(module, LocalResponseNorm):
            module.reference = True
    return {
        "towers_one_device": (AlexNet2GPU(AlexNetConfig(), (device, device)), 3),
        "towers_nn_lrn": (reference_lrn, 3),
        "fused": (AlexNetFused(AlexNetConfig(), device=device), 3),
        "torchvision": (torchvision.models.alexnet(num_classes=1000).to(device), 3),
        "one_tower_mnist": (AlexNetFused(one_tower_mnist, device=device), 1),
    }


def forward_flops(model: torch.nn.Module, channels: int, device: torch.device) -> int:
    """Forward FLOPs per image (a multiply-add counts 2), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, channels, 224, 224, device=device))
    return counter.get_total_flops()


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x).sum()
    return sum(storages.values())


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_models(
    *,
    device: str = "cpu",
    batches: tuple[int, ...] = (16, 64),
    repeats: int = 5,
    amp: str = "none",
    channels_last: bool = False,
    compile: bool = False,
) -> dict:
    """Median seconds of a training step (forward, backward, PaperSGD step) and of inference."""
    import torch.nn.functional as F

    from alexnet2gpu.engine import autocast
    from alexnet2gpu.optim import PaperSGD

    dev = torch.device(device)
    models = _models(dev)
    flops = {name: forward_flops(m, c, dev) for name, (m, c) in models.items()}
    runners, optimizers = {}, {}
    for name, (model, _) in models.items():
        if channels_last:
            model.to(memory_format=torch.channels_last)
        runners[name] = torch.compile(model) if compile else model
        optimizers[name] = PaperSGD(model.parameters(), lr=1e-4)
    inputs = {}
    for b in batches:
        for name, (_, c) in models.items():
            x = torch.randn(b, c, 224, 224, device=dev) * 50
            inputs[name, b] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    labels = {b: torch.randint(0, 10, (b,), device=dev) for b in batches}

    def train_step(name: str, b: int) -> None:
        model, opt = models[name][0], optimizers[name]
        model.train()
        with autocast(model, amp):
            logits = runners[name](inputs[name, b])
        loss = F.cross_entropy(logits.float(), labels[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer(name: str, b: int) -> None:
        models[name][0].eval()
        with autocast(models[name][0], amp):
            runners[name](inputs[name, b])

    cases = [(kind, name, b) for kind in ("train", "infer") for b in batches for name in models]
    times: dict[tuple, list[float]] = {case: [] for case in cases}
    for round_ in range(repeats + 1):  # round 0 warms up (and compiles)
        for kind, name, b in cases:
            _sync(dev)
            start = time.perf_counter()
            (train_step if kind == "train" else infer)(name, b)
            _sync(dev)
            if round_:
                times[kind, name, b].append(time.perf_counter() - start)
    peak = matmul_gflops(dev)
    memory = {}
    for name, (model, _) in models.items():
        memory[name] = {"params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
        memory[name]["saved_activations_mb_b64"] = saved_activation_bytes(model, inputs[name, batches[-1]]) / 2**20
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            train_step(name, batches[-1])
            memory[name]["cuda_peak_mb_train_b64"] = torch.cuda.max_memory_allocated(dev) / 2**20
    rows = []
    for (kind, name, b), ts in times.items():
        median = statistics.median(ts)
        work = flops[name] * b * (3 if kind == "train" else 1)
        tv = statistics.median(times[kind, "torchvision", b])
        rows.append(
            {
                "kind": kind,
                "model": name,
                "batch": b,
                "median_ms": round(1e3 * median, 1),
                "min_ms": round(1e3 * min(ts), 1),
                "max_ms": round(1e3 * max(ts), 1),
                "img_per_s": round(b / median, 1),
                "ratio_vs_torchvision": round(median / tv, 3),
                "gflop_per_s": round(work / median / 1e9, 1),
            }
        )
    med = {(r["kind"], r["model"], r["batch"]): r["median_ms"] for r in rows}
    b = batches[-1]
    return {
        "machine": machine(),
        "device": str(dev),
        "options": {"amp": amp, "channels_last": channels_last, "compile": compile, "repeats": repeats},
        "matmul_gflop_per_s": round(peak, 1),
        "forward_gflop_per_image": {name: round(f / 1e9, 3) for name, f in flops.items()},
        "rows": rows,
        "memory": {name: {k: round(v, 1) for k, v in m.items()} for name, m in memory.items()},
        "train_ratio_vs_torchvision": round(med["train", "towers_one_device", b] / med["train", "torchvision", b], 3),
        "train_ratio_towers_vs_fused": round(med["train", "towers_one_device", b] / med["train", "fused", b], 3),
        "train_ratio_nn_lrn_vs_torchvision": round(
            med["train", "towers_nn_lrn", b] / med["train", "torchvision", b], 3
        ),
    }


def print_model_table(result: dict) -> None:
    from alexnet2gpu.accounting import table

    opts = result["options"]
    print(
        f"models on {result['device']}; {result['machine']}; amp={opts['amp']}, channels_last={opts['channels_last']}, "
        f"compile={opts['compile']}, {opts['repeats']} interleaved rounds"
    )
    print(f"matrix product (2048^2, fp32): {result['matmul_gflop_per_s']} GFLOP/s")
    print(
        f"{'step':<6} {'model':<18} {'batch':>5} {'median ms':>10} {'min-max ms':>16} {'img/s':>8} "
        f"{'vs tv':>6} {'GFLOP/s':>8}"
    )
    for r in result["rows"]:
        spread = f"{r['min_ms']}-{r['max_ms']}"
        print(
            f"{r['kind']:<6} {r['model']:<18} {r['batch']:>5} {r['median_ms']:>10} {spread:>16} "
            f"{r['img_per_s']:>8} {r['ratio_vs_torchvision']:>6.3f} {r['gflop_per_s']:>8}"
        )
    print("forward GFLOP per image:", result["forward_gflop_per_image"])
    print("memory (MB):", result["memory"])
    print(
        f"train step, batch 64: towers/torchvision {result['train_ratio_vs_torchvision']:.3f}, "
        f"towers/fused {result['train_ratio_towers_vs_fused']:.3f}, "
        f"towers with nn.LocalResponseNorm/torchvision {result['train_ratio_nn_lrn_vs_torchvision']:.3f}"
    )
    print("\nbytes crossing between the towers' devices per image (float32):")
    print(table())


def main_models(args) -> None:
    from alexnet2gpu.devices import resolve_devices

    device = resolve_devices(args.device)[0] if args.device else resolve_devices(None)[0]
    if args.profile:
        print(profile_step(args.profile, device=str(device)))
        return
    result = bench_models(
        device=str(device), repeats=args.repeats, amp=args.amp, channels_last=args.channels_last, compile=args.compile
    )
    if args.json:
        print(json.dumps(result))
    else:
        print_model_table(result)


def profile_step(name: str, *, device: str = "cpu", batch: int = 64, rows: int = 15) -> str:
    """torch.profiler's table (self time per op) for one training step of one bench model."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from alexnet2gpu.optim import PaperSGD

    dev = torch.device(device)
    models = _models(dev)
    if name not in models:
        raise ValueError(f"--profile takes one of {', '.join(models)}, not {name!r}")
    model, channels = models[name]
    optimizer = PaperSGD(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, channels, 224, 224, device=dev) * 50, torch.randint(0, 10, (batch,), device=dev)

    def step() -> None:
        loss = F.cross_entropy(model.train()(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(dev)

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
