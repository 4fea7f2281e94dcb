"""Staging's JPEG settings against two goals: decoding at least 6x the live path per
worker, and staged pixels within 2 grey levels (mean absolute difference) of the live path's.
For each setting: staged size, `decode_jpeg` speed over the live path (CPU-seconds of this process,
one thread, the two timed in alternation), and the mean difference, on the bench's generated
ImageNet-like photos and on any real photos given. "flat S/C": every DCT coefficient quantised with
step S (luma) and C (chroma) instead of the IJG tables that `quality` scales, which spend bits on
what the eye sees rather than on the pixels' values.

    python experiments/jpeg_settings.py [--images 150] [--photos a.jpg b.jpg ...]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from alexnet2gpu.bench import machine, write_imagenet_like
from alexnet2gpu.data.images import stage_image

SETTINGS = [  # (name, subsampling, PIL save options)
    ("quality 95 (default)", "4:4:4", dict(quality=95)),
    ("quality 95", "4:2:0", dict(quality=95)),
    ("quality 97", "4:2:0", dict(quality=97)),
    ("quality 90", "4:2:0", dict(quality=90)),
    ("flat 6/6", "4:4:4", dict(qtables=[[6] * 64, [6] * 64])),
    ("flat 4/4", "4:2:0", dict(qtables=[[4] * 64, [4] * 64])),
    ("flat 5/5", "4:2:0", dict(qtables=[[5] * 64, [5] * 64])),
]


def encode(image: torch.Tensor, subsampling: str, options: dict) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(
        buffer, "JPEG", subsampling=subsampling, optimize=True, **options
    )
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def difference(encoded: list[torch.Tensor], images: list[torch.Tensor]) -> float:
    return float(
        np.mean(
            [
                (decode_jpeg(e, mode=ImageReadMode.RGB).int() - x.int()).abs().float().mean()
                for e, x in zip(encoded, images, strict=True)
            ]
        )
    )


def cpu_seconds(work, items) -> float:
    start = time.process_time()
    for item in items:
        work(item)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", nargs="*", default=[], help="real photos to compare the differences on")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(write_imagenet_like(Path(tmp), args.images).glob("train/*/*.JPEG"))
        live = [stage_image(f) for f in files]
        photos = [stage_image(p) for p in args.photos]
        print(f"{machine()}; {len(files)} generated photos, {len(photos)} real photos\n")
        head = "| setting | subsampling | staged KB | decode / live per worker | mean abs diff |"
        print(head + "".join(f" {Path(p).name} |" for p in args.photos))
        print("|---" * (5 + len(photos)) + "|")
        for name, subsampling, options in SETTINGS:
            encoded = [encode(x, subsampling, options) for x in live]
            ratios = []
            for _ in range(args.rounds):  # alternate, so that load on a shared machine hits both alike
                live_s = cpu_seconds(stage_image, files) / len(files)
                decode_s = cpu_seconds(lambda e: decode_jpeg(e, mode=ImageReadMode.RGB), encoded) / len(encoded)
                ratios.append(live_s / decode_s)
            kb = np.mean([len(e) for e in encoded]) / 1000
            row = f"| {name} | {subsampling} | {kb:.1f} | {np.median(ratios):.2f}x | {difference(encoded, live):.2f} |"
            row += "".join(f" {difference([encode(p, subsampling, options)], [p]):.2f} |" for p in photos)
            print(row, flush=True)


if __name__ == "__main__":
    main()
