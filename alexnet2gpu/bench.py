"""Benchmarks: ratios measured within one run, interleaved, never in tests.

`python -m alexnet2gpu bench --data`: images/s of the paper's batched train pipeline against the
seed's per-sample torchvision transforms, on the same images.
`python -m alexnet2gpu bench --imagenet`: the live ImageNet folder path against a staged copy.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from alexnet2gpu.config import DataConfig, StageConfig
from alexnet2gpu.data.datasets import InMemory, batches, build_dataset, collate_skipping
from alexnet2gpu.data.staged import StagedImages
from alexnet2gpu.data.staging import stage
from alexnet2gpu.data.stats import fit_stats
from alexnet2gpu.data.transforms import input_pipeline


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
    paper = input_pipeline(DataConfig(dataset=dataset), fit_stats(train), dev, train=True)
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
    images = args.images or 3000
    result = bench_data(dataset=args.dataset, data=args.data_dir, device=args.device or "cpu", images=images)
    print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_data_table(result)


# ---------------------------------------------------------------------------------------------
# ImageNet: the live folder path against the staged one, on generated ImageNet-like photos

IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (500, 500))  # common in ImageNet
# ImageNet's 1.28M training images take about 140 GB: about 110 KB each, at a typical 500x375
GPU_STEP_RATES = {"V100 fp32": 5_000, "A100 fp16": 16_000}  # img/s, public benchmarks (docs/DATA.md)
# 1.2 M images x 90 epochs (P 5) in 3 hours = 10,700 img/s, what two H100-class GPUs need to be fed
TARGET_IMG_PER_S = 10_700


def imagenet_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour regions, sharp-edged shapes and grey texture at five
    scales with amplitude growing with scale (1/f, as in natural images), plus a little colour
    grain. Saved as JPEG quality 90 it takes about 80-105 KB at 500x375, as ImageNet's photos do."""
    grid = rng.integers(0, 256, (rng.integers(3, 7), rng.integers(3, 7), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = (x0, y0, x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.integers(0, 256, 3).tolist()))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)  # (H, W, 3)
    amplitude = rng.uniform(28, 45)
    for k in range(5):  # grey texture in cells of 1, 2, 4, 8, 16 pixels
        cells = rng.normal(0, 1, (height // 2**k + 1, width // 2**k + 1)).astype(np.float32)
        layer = Image.fromarray(cells, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        pixels += np.asarray(layer)[..., None] * amplitude * 0.8 ** (4 - k)
    pixels += rng.normal(0, 0.15 * amplitude, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_imagenet_like(root: Path, images: int, classes: int = 10, seed: int = 0) -> Path:
    """root/{train,val}/<class>/*.JPEG: `images` training images and a tenth as many for validation."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            size = IMAGENET_SIZES[rng.integers(len(IMAGENET_SIZES))]
            imagenet_like(rng, *size).save(folder / f"{split}_{i:06d}.JPEG", quality=90)
    return root


def _rate(run: Callable[[], int], in_process: bool) -> float:
    """img/s of `run()`: per CPU-second of this process for work done in it (a worker's own rate,
    which other load on a shared machine does not change), per wall-clock second for work in workers."""
    clock = time.process_time if in_process else time.perf_counter
    start = clock()
    n = run()
    return n / (clock() - start)


def _count(loader: DataLoader) -> Callable[[], int]:
    return lambda: sum(len(labels) for _, labels in loader)


def _compare(live, staged) -> tuple[bool, float]:
    """Whether the labels agree, and the mean absolute difference of the pixels (grey levels)."""
    same, total, count = True, 0.0, 0
    pairs = zip(batches(live, 64, shuffle=False), batches(staged, 64, shuffle=False), strict=True)
    for (x, y), (sx, sy) in pairs:
        same = same and torch.equal(y, sy)
        total += (x.float() - sx.float()).abs().sum().item()
        count += x.numel()
    return same, total / count


def _gpu_decode_rate(staged: StagedImages, batch: int = 128, repeats: int = 3) -> float | None:
    if not torch.cuda.is_available():
        return None
    encoded = [torch.frombuffer(staged.encoded(staged.index[i]), dtype=torch.uint8) for i in range(len(staged))]
    chunks = [encoded[i : i + batch] for i in range(0, len(encoded), batch)]
    decode_jpeg(chunks[0], mode=ImageReadMode.RGB, device="cuda")  # warm-up (nvJPEG handles)
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for chunk in chunks:
            decode_jpeg(chunk, mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        rates.append(len(encoded) / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_imagenet(
    *, images: int = 500, repeats: int = 5, workers: int | None = None, stage_config: StageConfig | None = None
) -> dict:
    """img/s of the live folder path and of the staged path on the same generated photos, timed in
    interleaved rounds: in this process with one thread, as a loader worker runs (per worker, per
    CPU-second), and in `workers` processes (all cores, per wall-clock second)."""
    workers = workers or os.cpu_count() or 1
    stage_config = stage_config or StageConfig()
    with tempfile.TemporaryDirectory(prefix="alexnet2gpu-bench-") as tmp:
        raw = write_imagenet_like(Path(tmp) / "raw", images)
        start = time.perf_counter()
        manifest = stage(raw, Path(tmp) / "staged", stage_config, workers=workers, progress=False)
        stage_rate = sum(s["sources"] for s in manifest["splits"].values()) / (time.perf_counter() - start)
        live = build_dataset("imagenet", "train", str(raw))
        staged = build_dataset("imagenet", "train", str(Path(tmp) / "staged"))
        raw_bytes = sum(path.stat().st_size for path, _ in live.samples)

        def loader(dataset, processes: int) -> DataLoader:
            extra = {"persistent_workers": True, "prefetch_factor": 4} if processes else {}
            return DataLoader(dataset, batch_size=64, num_workers=processes, collate_fn=collate_skipping, **extra)

        encoded = [torch.frombuffer(staged.encoded(row), dtype=torch.uint8) for row in staged.index]
        cases = {  # name -> (run, in this process)
            "raw_per_worker": (_count(loader(live, 0)), True),
            "staged_per_worker": (_count(loader(staged, 0)), True),
            "staged_decode_only": (lambda: len([decode_jpeg(e, mode=ImageReadMode.RGB) for e in encoded]), True),
            "raw_all_workers": (_count(loader(live, workers)), False),
            "staged_all_workers": (_count(loader(staged, workers)), False),
        }
        for name in ("raw_all_workers", "staged_all_workers"):
            cases[name][0]()  # starts the worker processes, once
        rates: dict[str, list[float]] = {name: [] for name in cases}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a loader worker
        for _ in range(repeats):
            for name, (run, in_process) in cases.items():
                rates[name].append(_rate(run, in_process))
        torch.set_num_threads(threads)
        del cases  # the loaders' worker processes end here
        labels_equal, difference = _compare(live, staged)
        gpu = _gpu_decode_rate(staged)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    staged_per_worker = medians["staged_per_worker"]
    return {
        "machine": machine(),
        "images": len(live),
        "workers": workers,
        "quality": stage_config.quality,
        "subsampling": stage_config.subsampling,
        "raw_img_per_s_per_worker": round(medians["raw_per_worker"]),
        "staged_img_per_s_per_worker": round(staged_per_worker),
        "ratio_staged_vs_raw": round(staged_per_worker / medians["raw_per_worker"], 2),
        "staged_img_per_s_all_workers": round(medians["staged_all_workers"]),
        "ratio_decode_only_vs_raw": round(medians["staged_decode_only"] / medians["raw_per_worker"], 2),
        "gpu_decode_img_per_s": None if gpu is None else round(gpu),
        "img_per_s": {name: round(v) for name, v in medians.items()},
        "spread": {name: [round(min(r)), round(max(r))] for name, r in rates.items()},
        "stage_img_per_s": round(stage_rate, 1),
        "raw_kb_per_image": round(raw_bytes / len(live) / 1e3, 1),
        "staged_kb_per_image": round(manifest["splits"]["train"]["bytes"] / len(staged) / 1e3, 1),
        "staged_gb_per_million_images": round(manifest["splits"]["train"]["bytes"] / len(staged) * 1e6 / 1e9, 1),
        "labels_equal": labels_equal,
        "mean_abs_diff_staged_vs_live": round(difference, 3),
        "sixteen_cores_img_per_s": {
            "raw": round(16 * medians["raw_per_worker"]),
            "staged": round(16 * staged_per_worker),
        },
        "gpu_step_rates_img_per_s": GPU_STEP_RATES,
        "cores_for_img_per_s": {  # loader processes, one per core, that feed the target rate
            "img_per_s": TARGET_IMG_PER_S,
            "staged": math.ceil(TARGET_IMG_PER_S / staged_per_worker),
            "raw": math.ceil(TARGET_IMG_PER_S / medians["raw_per_worker"]),
        },
    }


def print_imagenet_table(result: dict) -> None:
    print(
        f"ImageNet-like photos, {result['images']} images ({result['raw_kb_per_image']} KB each), staged at quality "
        f"{result['quality']}, {result['subsampling']} ({result['staged_kb_per_image']} KB each); {result['machine']}"
    )
    print(f"{'path':<22} {'img/s (median)':>15} {'min-max':>16}")
    for name, rate in result["img_per_s"].items():
        low, high = result["spread"][name]
        print(f"{name:<22} {rate:>15,} {f'{low:,}-{high:,}':>16}")
    gpu = result["gpu_decode_img_per_s"]
    print(f"GPU decode (batches of 128): {'no CUDA device' if gpu is None else f'{gpu:,} img/s'}")
    print(
        f"staged / live, per worker: {result['ratio_staged_vs_raw']:.2f}x (decode_jpeg alone: "
        f"{result['ratio_decode_only_vs_raw']:.2f}x); all workers: {result['workers']} processes, wall clock"
    )
    print(
        f"staged pixels against the live path's: mean |diff| {result['mean_abs_diff_staged_vs_live']} grey levels; "
        f"labels equal: {result['labels_equal']}"
    )
    print(
        f"staging: {result['stage_img_per_s']} img/s; disk: {result['staged_gb_per_million_images']} GB per million "
        f"staged images"
    )
    cores = result["sixteen_cores_img_per_s"]
    print(
        f"16 cores would feed {cores['staged']:,} img/s staged, {cores['raw']:,} live; GPU steps: "
        + ", ".join(f"{k} {v:,} img/s" for k, v in result["gpu_step_rates_img_per_s"].items())
    )
    need = result["cores_for_img_per_s"]
    print(f"cores to feed {need['img_per_s']:,} img/s: {need['staged']} staged, {need['raw']} live")


def main_imagenet(args) -> None:
    config = StageConfig(quality=args.quality, subsampling=args.subsampling)
    result = bench_imagenet(images=args.images or 500, repeats=args.repeats, workers=args.workers, stage_config=config)
    if args.json:
        print(json.dumps(result))
    else:
        print_imagenet_table(result)


# ---------------------------------------------------------------------------------------------
# models: a training step and inference, every model timed in the same rounds


def _models(device: torch.device) -> dict[str, tuple[torch.nn.Module, int]]:
    """name -> (model, input channels). one_tower_mnist is one full-width tower without LRN, padded to
    227 and with P's three fc layers (the earlier seed preset, not the seed's exact network);
    towers_nn_lrn is the towers with PyTorch's LRN instead of alexnet2gpu.model.lrn; towers_paper the towers
    as `--preset paper` builds them (P's text: ReLU before LRN1, no spatial norm, fc8 split), against
    the default K12 towers (LRN1 on conv1's linear output, the spatial norm, one fc8 on tower A)."""
    import torchvision

    from alexnet2gpu.config import AlexNetConfig, recipe
    from alexnet2gpu.model.alexnet import AlexNet2GPU, AlexNetFused
    from alexnet2gpu.model.layers import LocalResponseNorm

    torch.manual_seed(0)
    one_tower_mnist = AlexNetConfig(towers=1, lrn=False, in_channels=1, num_classes=10)
    reference_lrn = AlexNet2GPU(AlexNetConfig(), (device, device))
    for module in reference_lrn.modules():
        if isinstance(module, LocalResponseNorm):
            module.reference = True
    return {
        "towers_one_device": (AlexNet2GPU(AlexNetConfig(), (device, device)), 3),
        "towers_nn_lrn": (reference_lrn, 3),
        "towers_paper": (AlexNet2GPU(AlexNetConfig(**recipe("paper", "model")), (device, device)), 3),
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

    from alexnet2gpu.train.evaluate import autocast
    from alexnet2gpu.train.optim import PaperSGD

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
        "train_ratio_k12_vs_paper": round(med["train", "towers_one_device", b] / med["train", "towers_paper", b], 3),
    }


def print_model_table(result: dict) -> None:
    from alexnet2gpu.model.exchanges import table

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
        f"towers with nn.LocalResponseNorm/torchvision {result['train_ratio_nn_lrn_vs_torchvision']:.3f}, "
        f"towers (K12's, the default)/towers as --preset paper builds them {result['train_ratio_k12_vs_paper']:.3f}"
    )
    print("\nbytes crossing between the towers' devices per image (float32):")
    print(table())


def main_models(args) -> None:
    from alexnet2gpu.devices import resolve_devices

    device = resolve_devices(args.device)[0] if args.device else resolve_devices(None)[0]
    torch.backends.cudnn.benchmark = True  # fixed shapes, as in training: cuDNN times its algorithms once
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

    from alexnet2gpu.train.optim import PaperSGD

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
