"""Caffe files written by hand for the tests: a protobuf writer of the few messages a caffemodel holds
(caffe.proto: NetParameter, V1LayerParameter, LayerParameter, BlobProto, BlobShape), random AlexNet
weights in Caffe's grouped layout, and the mean image.

Independent of alexnet2gpu.caffe (which reads them): field numbers as caffe.proto has them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

SMALL = dict(conv=(8, 16, 24, 24, 16), fc=(32, 32), classes=10)  # the layout of bvlc_alexnet, narrower
REAL = dict(conv=(96, 256, 384, 384, 256), fc=(4096, 4096), classes=1000)  # bvlc_alexnet's
NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
V1_TYPES = {"conv": 4, "fc": 14, "data": 5, "relu": 18, "loss": 21}  # V1LayerParameter.LayerType
NEW_TYPES = {"conv": "Convolution", "fc": "InnerProduct", "data": "Data", "relu": "ReLU", "loss": "SoftmaxWithLoss"}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def message(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return key(field, 2) + varint(len(payload)) + payload


def number(field: int, n: int) -> bytes:
    return key(field, 0) + varint(n)


def blob(t: torch.Tensor, *, legacy: bool, encoding: str = "packed") -> bytes:
    """A BlobProto: legacy num/channels/height/width 1-4 (V1 files: fc weights (1, 1, out, in), biases
    (1, 1, 1, out)), else shape 7 (BlobShape dim 1, packed); data 5 packed, or one fixed32 per value
    ("unpacked"), or double_data 8 ("double")."""
    if legacy:
        dims = (1,) * (4 - t.dim()) + tuple(t.shape)
        out = b"".join(number(f, d) for f, d in zip((1, 2, 3, 4), dims, strict=True))
    else:
        out = message(7, message(1, b"".join(varint(d) for d in t.shape)))
    values = t.detach().contiguous().numpy()
    if encoding == "packed":
        out += message(5, values.astype("<f4").tobytes())
    elif encoding == "unpacked":
        out += b"".join(key(5, 5) + struct.pack("<f", v) for v in values.ravel().tolist())
    else:
        out += message(8, values.astype("<f8").tobytes())
    return out


def layer(name: str, kind: str, blobs: list[bytes], fmt: str, bottom: str = "", top: str = "") -> bytes:
    """A V1LayerParameter (bottom 2, top 3, name 4, type 5 enum, blobs 6) or a LayerParameter (name 1,
    type 2 string, bottom 3, top 4, blobs 7), as Caffe writes them (in field order)."""
    if fmt == "v1":
        body = message(2, bottom.encode()) if bottom else b""
        body += message(3, (top or name).encode()) + message(4, name.encode()) + number(5, V1_TYPES[kind])
        return body + b"".join(message(6, b) for b in blobs)
    body = message(1, name.encode()) + message(2, NEW_TYPES[kind].encode())
    body += (message(3, bottom.encode()) if bottom else b"") + message(4, (top or name).encode())
    return body + b"".join(message(7, b) for b in blobs)


def caffe_weights(conv=SMALL["conv"], fc=SMALL["fc"], classes=SMALL["classes"], seed: int = 0) -> dict:
    """Random (weights, biases) per layer in Caffe's shapes (conv (out, in/group, kh, kw), fc (out, in)),
    He-scaled so that every layer, and LRN with it, shapes the logits."""
    c1, c2, c3, c4, c5 = conv
    f6, f7 = fc
    shapes = {
        "conv1": (c1, 3, 11, 11),
        "conv2": (c2, c1 // 2, 5, 5),
        "conv3": (c3, c2, 3, 3),
        "conv4": (c4, c3 // 2, 3, 3),
        "conv5": (c5, c4 // 2, 3, 3),
        "fc6": (f6, c5 * 6 * 6),
        "fc7": (f7, f6),
        "fc8": (classes, f7),
    }
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        out[name] = (
            torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5,
            torch.randn(shape[0], generator=g) * 0.5,
        )
    return out


def caffemodel(
    weights: dict, fmt: str = "v1", *, skip: tuple[str, ...] = (), encodings: dict | None = None
) -> tuple[bytes, dict[str, int]]:
    """A NetParameter (V1: layers = 2; new: layer = 100) as a snapshot of the train net (data, ReLU and
    loss layers among the weighted ones); also where each layer starts in the bytes."""
    field = 2 if fmt == "v1" else 100
    parts, starts, size = [message(1, b"AlexNet")], {}, 0
    parts.append(message(field, layer("data", "data", [], fmt, top="data")))
    previous = "data"
    for name in NAMES:
        if name in skip:
            continue
        w, b = weights[name]
        kind = "conv" if name.startswith("conv") else "fc"
        encoding = (encodings or {}).get(name, "packed")
        blobs = [blob(w, legacy=fmt == "v1"), blob(b, legacy=fmt == "v1", encoding=encoding)]
        size = sum(len(p) for p in parts)
        starts[name] = size
        parts.append(message(field, layer(name, kind, blobs, fmt, bottom=previous)))
        parts.append(message(field, layer(f"relu_{name}", "relu", [], fmt, bottom=name, top=name)))
        previous = name
    parts.append(message(field, layer("loss", "loss", [], fmt, bottom=previous)))
    return b"".join(parts), starts


def mean_image(seed: int = 0, size: int = 256) -> torch.Tensor:
    """A (3, size, size) BGR mean image near CF's (B 104, G 117, R 123), varying over the pixels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([104.0, 116.7, 122.7])[:, None, None]
    return base + 20 * torch.rand(3, size, size, generator=g) - 10


def write_mean(path: Path, mean_bgr: torch.Tensor) -> Path:
    """imagenet_mean.binaryproto: a BlobProto 1x3xHxW (legacy shape fields, packed data)."""
    path.write_bytes(blob(mean_bgr[None], legacy=True))
    return path


def write_model(path: Path, weights: dict, fmt: str = "v1", **options) -> Path:
    path.write_bytes(caffemodel(weights, fmt, **options)[0])
    return path
