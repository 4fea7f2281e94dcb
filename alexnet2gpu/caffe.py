"""Caffe's bvlc_alexnet.caffemodel in the towers: the only published weights of the grouped 2012 network.

CF = BVLC/caffe, `models/bvlc_alexnet` and `src/caffe/proto/caffe.proto`. A caffemodel is a protobuf
`NetParameter`, read here by hand (a varint / length-delimited reader; no protobuf dependency):

    NetParameter      layers = 2 (V1LayerParameter: name 4, type 5 an enum, blobs 6), the old format
                      bvlc_alexnet has; layer = 100 (LayerParameter: name 1, type 2 a string, blobs 7)
    BlobProto         num 1, channels 2, height 3, width 4 (legacy shape), data 5 (packed float),
                      shape 7 (BlobShape: dim 1, packed int64), double_data 8

Layers are matched by name (conv1 ... fc8; a snapshot of the train net also holds data, loss and
accuracy layers). Blobs: conv (out, in/group, kh, kw), fc (out, in) (V1: (1, 1, out, in)), biases
(out,) (V1: (1, 1, 1, out)). The grouped (fused) layout is `AlexNetFused`'s: group 0 is tower A, and
`model.fused_to_towers` splits it. CF's function differs from P's in ways the imported config records
(`AlexNetConfig.caffe`): 227 inputs, LRN k=1 over all channels (across the towers), and the input is
BGR on 0-255 minus the 256x256 mean image `imagenet_mean.binaryproto` (`DataConfig.preset="caffe"`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from alexnet2gpu import files
from alexnet2gpu.config import AlexNetConfig, ConfigError, DataConfig, TrainConfig, recipe
from alexnet2gpu.data.base import Categories
from alexnet2gpu.data.stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC, DataStats
from alexnet2gpu.files import read_regular
from alexnet2gpu.model.layers import LAYERS
from alexnet2gpu.train.rundir import RunDir

BVLC_ALEXNET_SHA1 = "9116a64c0fbe4459d18f4bb6b56d647b63920377"  # CF models/bvlc_alexnet/readme.md
# CF's ImageNet mean per channel, B, G, R (about; the mean image's averages): used without --mean
CAFFE_MEAN_BGR = (104.0, 116.7, 122.7)
KERNELS = {"conv1": 11, "conv2": 5, "conv3": 3, "conv4": 3, "conv5": 3}
GROUPED = ("conv2", "conv4", "conv5")  # CF `group: 2`: each tower's own maps


class CaffeError(ValueError):
    """A file that cannot be imported; the message is one line, naming the file and the layer."""


# ---------------------------------------------------------------------------------------------
# the protobuf wire format: (field number, wire type) keys, varints, length-delimited slices

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class Truncated(Exception):
    """The bytes end inside a value."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise Truncated
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field, wire type, value) of a message in buf[start:end]: an int for varints and fixed
    values, a (start, end) slice of buf for length-delimited ones. Raises Truncated or ValueError."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == LENGTH:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise Truncated
            value, pos = (pos, pos + size), pos + size
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if pos + width > end:
                raise Truncated
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        else:  # 3 and 4 (groups) are not in caffe.proto; 6 and 7 do not exist
            raise ValueError(f"wire type {wire}")
        yield field, wire, value


def _packed_varints(buf: memoryview, start: int, end: int) -> list[int]:
    out, pos = [], start
    while pos < end:
        value, pos = _varint(buf, pos, end)
        out.append(value)
    return out


def read_blob(buf: memoryview, start: int, end: int) -> torch.Tensor:
    """A BlobProto as a float32 tensor of its shape (BlobShape, else legacy num/channels/height/width)."""
    legacy, shape, chunks = {}, None, []
    for field, wire, value in fields(buf, start, end):
        if field in (1, 2, 3, 4) and wire == VARINT:
            legacy[field] = value
        elif field == 5 and wire == LENGTH:  # packed float
            chunks.append(np.frombuffer(buf[value[0] : value[1]], dtype="<f4"))
        elif field == 5 and wire == FIXED32:  # one unpacked float
            chunks.append(np.array([struct.unpack("<f", value.to_bytes(4, "little"))[0]], dtype="<f4"))
        elif field == 8 and wire == LENGTH:  # packed double
            chunks.append(np.frombuffer(buf[value[0] : value[1]], dtype="<f8").astype("<f4"))
        elif field == 8 and wire == FIXED64:
            chunks.append(np.array([struct.unpack("<d", value.to_bytes(8, "little"))[0]], dtype="<f4"))
        elif field == 7 and wire == LENGTH:  # BlobShape: dim 1, packed (or not) int64
            dims = []
            for f, w, v in fields(buf, *value):
                if f == 1:
                    dims += _packed_varints(buf, *v) if w == LENGTH else [v]
            shape = tuple(dims)
    if shape is None:
        shape = tuple(legacy.get(f, 0) for f in (1, 2, 3, 4)) if legacy else (0,)
    data = np.concatenate(chunks) if chunks else np.zeros(0, dtype="<f4")
    if data.size != math.prod(shape):
        raise ValueError(f"holds {data.size:,} values, but its shape {shape} says {math.prod(shape):,}")
    return torch.from_numpy(data.astype(np.float32).reshape(shape))


def _name(buf: memoryview, start: int, end: int, name_field: int) -> str | None:
    """A layer's name, read from as much of the layer as there is (a truncated one included)."""
    try:
        for field, wire, value in fields(buf, start, end):
            if field == name_field and wire == LENGTH:
                return bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
    except (Truncated, ValueError):
        pass
    return None


# NetParameter field -> (the layer's name field, its blobs field): the V1 format, and the new one
FORMATS = {2: (4, 6), 100: (1, 7)}


def read_layers(data: bytes, path: str | Path) -> dict[str, list[torch.Tensor]]:
    """Every layer's blobs by name, from a caffemodel's bytes; one line naming the layer on failure."""
    buf = memoryview(data)
    layers: dict[str, list[torch.Tensor]] = {}
    formats: set[int] = set()
    current = None
    try:
        for field, wire, value in fields(buf, 0, len(buf)):
            current = None
            if field not in FORMATS or wire != LENGTH:
                continue
            name_field, blobs_field = FORMATS[field]
            current = _name(buf, *value, name_field) or f"#{len(layers) + 1}"
            blobs = [read_blob(buf, *v) for f, w, v in fields(buf, *value) if f == blobs_field and w == LENGTH]
            formats.add(field)
            if len(formats) > 1:  # Caffe refuses such a net too ("both 'layer' and 'layers' fields")
                raise CaffeError(
                    f"{path} holds layers in both Caffe formats (V1 `layers` and new `layer`; {current!r} is "
                    "the first of the second): one of them is stale; upgrade it with Caffe's upgrade_net_proto_binary"
                )
            if blobs and layers.get(current):
                raise CaffeError(
                    f"{path} holds two layers named {current!r} with weights: which one Caffe would use is "
                    "not defined; keep one (Caffe's net surgery) and import again"
                )
            layers[current] = blobs or layers.get(current, [])
    except Truncated:
        current = _truncated_layer(buf) or current
        where = f" in layer {current!r}" if current else ""
        raise CaffeError(f"{path} is truncated{where} ({len(data):,} bytes): download it again") from None
    except CaffeError:
        raise  # already the one line, naming the layer
    except ValueError as error:
        if current:
            raise CaffeError(f"{path}: layer {current!r} cannot be read ({error}); is it a .caffemodel?") from None
        raise CaffeError(f"{path} is not a Caffe model ({error} in its NetParameter); expected a .caffemodel") from None
    if not layers:
        raise CaffeError(f"{path} is not a Caffe model: it holds no layers (NetParameter.layer or .layers)")
    return layers


def _truncated_layer(buf: memoryview) -> str | None:
    """The name of the layer the bytes end in, read from as much of it as there is."""
    pos, end = 0, len(buf)
    try:
        while pos < end:
            key, pos = _varint(buf, pos, end)
            field, wire = key >> 3, key & 7
            if wire == VARINT:
                pos = _varint(buf, pos, end)[1]
            elif wire == LENGTH:
                size, pos = _varint(buf, pos, end)
                if pos + size > end:
                    return _name(buf, pos, end, FORMATS[field][0]) if field in FORMATS else None
                pos += size
            else:
                pos += 8 if wire == FIXED64 else 4
    except (Truncated, ValueError):
        pass
    return None


def read_caffemodel(path: str | Path) -> tuple[dict[str, list[torch.Tensor]], str]:
    """The layers' blobs by name, and the file's sha1."""
    path = Path(path)
    data = _read(path, "Caffe model")
    return read_layers(data, path), hashlib.sha1(data).hexdigest()


# What a file may hold, read whole: bvlc_alexnet.caffemodel holds 233 MB, imagenet_mean.binaryproto 786 KB
READ_LIMITS = {"Caffe model": 4 << 30, "mean image": 64 << 20, "class list": 16 << 20}


def _read(path: Path, what: str) -> bytes:
    if not path.exists():
        raise CaffeError(f"no {what} at {path}")
    try:
        data = read_regular(path, READ_LIMITS[what])  # a FIFO or a device is refused, not read
    except OSError as error:
        raise CaffeError(f"cannot read {what} {path}: {error.strerror}") from None
    if not data:
        raise CaffeError(f"{path} is empty (0 bytes), not a {what}")
    return data


def read_mean(path: str | Path) -> torch.Tensor:
    """CF's mean image (`imagenet_mean.binaryproto`: a BlobProto 1x3x256x256, BGR) as (3, H, W) RGB on 0-255."""
    path = Path(path)
    data = _read(path, "mean image")
    try:
        mean = read_blob(memoryview(data), 0, len(data))
    except Truncated:
        raise CaffeError(f"{path} is truncated ({len(data):,} bytes): download it again") from None
    except ValueError as error:
        raise CaffeError(f"{path} is not a Caffe mean image (a BlobProto: {error})") from None
    if mean.dim() == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.dim() != 3 or mean.shape[0] != 3 or mean.shape[1] != mean.shape[2] or mean.shape[1] < 227:
        raise CaffeError(f"{path}: a mean image of shape {tuple(mean.shape)}; expected (1, 3, S, S), S >= 227")
    if not torch.isfinite(mean).all() or mean.min() < 0 or mean.max() > 255:
        finite = torch.isfinite(mean)
        said = "not finite values" if not finite.all() else ""
        if finite.any() and (mean[finite].min() < 0 or mean[finite].max() > 255):
            low, high = mean[finite].min().item(), mean[finite].max().item()
            said += f"{' and ' if said else ''}values from {low:g} to {high:g}"
        raise CaffeError(
            f"{path}: a mean image with {said}; a mean of 8-bit pixels lies in 0..255: "
            "download imagenet_mean.binaryproto again"
        )
    return mean.flip(0).contiguous()  # BGR -> RGB: our stored images are RGB; the preset turns them


# ---------------------------------------------------------------------------------------------
# blobs -> the fused (grouped) state dict -> the towers


def _blobs(layers: dict[str, list[torch.Tensor]], name: str, path) -> tuple[torch.Tensor, torch.Tensor]:
    blobs = layers.get(name)
    if blobs is None:
        have = ", ".join(list(layers)[:12])
        raise CaffeError(f"{path} lacks layer {name!r} (it has: {have}); is it an AlexNet (bvlc_alexnet)?")
    if len(blobs) != 2:
        raise CaffeError(f"{path}: layer {name!r} holds {len(blobs)} blobs; expected 2 (weights, biases)")
    return blobs[0], blobs[1]


def _fit(blob: torch.Tensor, shape: tuple[int, ...], name: str, what: str, path) -> torch.Tensor:
    """`blob` as `shape`, when it is that shape with leading 1s (V1: fc (1, 1, out, in), bias (1, 1, 1, out))."""
    dims = tuple(blob.shape)
    while len(dims) > len(shape) and dims[0] == 1:
        dims = dims[1:]
    if dims != shape:
        raise CaffeError(f"{path}: layer {name!r} has {what} of shape {tuple(blob.shape)}; expected {shape}")
    return blob.reshape(shape)


def infer_config(layers: dict[str, list[torch.Tensor]], path) -> AlexNetConfig:
    """CF's network with the widths the blobs have: bvlc_alexnet's (96, 256, 384, 384, 256; 4096, 4096;
    1000 classes), or a smaller net of the same layout (the tests' files)."""
    rows = {}
    for name in LAYERS:
        weight = _blobs(layers, name, path)[0]
        dims = 4 if name in KERNELS else 2  # conv (out, in, kh, kw); fc (out, in), V1 (1, 1, out, in)
        if weight.dim() < dims or weight.shape[-dims] < 1:
            kind = "(out, in/group, kh, kw)" if dims == 4 else "(out, in)"
            raise CaffeError(f"{path}: layer {name!r} has weights of shape {tuple(weight.shape)}; expected {kind}")
        rows[name] = weight.shape[-dims]
    in_channels = _blobs(layers, "conv1", path)[0].shape[-3]
    if in_channels != 3:  # the caffe preset feeds BGR photos, and its mean image has 3 channels
        raise CaffeError(f"{path}: layer 'conv1' reads {in_channels} channels; Caffe's AlexNet reads 3 (BGR)")
    try:
        return AlexNetConfig.caffe(
            num_classes=rows["fc8"],
            in_channels=in_channels,
            conv_channels=tuple(rows[f"conv{i}"] for i in range(1, 6)),
            fc_features=(rows["fc6"], rows["fc7"]),
        )
    except ConfigError as error:
        layer = {"conv_channels": "conv1 to conv5", "fc_features": "fc6, fc7", "num_classes": "fc8"}
        raise CaffeError(
            f"{path}: layer(s) {layer.get(error.field, 'conv1')} do not make a two-tower AlexNet: {error}"
        ) from None


def fused_state(layers: dict[str, list[torch.Tensor]], config: AlexNetConfig, path) -> dict[str, torch.Tensor]:
    """`AlexNetFused`'s state dict from CF's blobs, every shape checked against `config`."""
    c, f = config.conv_channels, config.fc_features
    groups = config.towers
    pool5 = config.map_sizes[-1]  # 6
    inputs = {
        "conv1": config.in_channels,
        "conv2": c[0] // groups,
        "conv3": c[1],
        "conv4": c[2] // groups,
        "conv5": c[3] // groups,
        "fc6": c[4] * pool5 * pool5,  # pool5 flattened as (C, H, W), tower A's channels first
        "fc7": f[0],
        "fc8": f[1],
    }
    outputs = dict(zip(LAYERS, (*c, *f, config.num_classes), strict=True))
    state = {}
    for name in LAYERS:
        weight, bias = _blobs(layers, name, path)
        shape = (outputs[name], inputs[name])
        if name in KERNELS:
            shape += (KERNELS[name], KERNELS[name])
        state[f"{name}.weight"] = _fit(weight, shape, name, "weights", path)
        state[f"{name}.bias"] = _fit(bias, (outputs[name],), name, "biases", path)
        if not torch.isfinite(state[f"{name}.weight"]).all() or not torch.isfinite(state[f"{name}.bias"]).all():
            raise CaffeError(f"{path}: layer {name!r} holds NaN or inf")
    return state


# ---------------------------------------------------------------------------------------------
# the checkpoint


def read_words(path: str | Path, num_classes: int) -> Categories:
    """CF's `synset_words.txt` ("n01440764 tench, Tinca tinca" per line, in label order)."""
    path = Path(path)
    text = _read(path, "class list").decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.split("\n") if line.strip()]  # a U+2028 in a name is no line break
    if len(lines) != num_classes:
        raise CaffeError(f"{path} names {len(lines)} classes; the model's fc8 has {num_classes}")
    split = [line.partition(" ") for line in lines]
    return Categories(tuple(wnid for wnid, _, _ in split), tuple(text.strip() or wnid for wnid, _, text in split))


def build_checkpoint(
    weights: str | Path, mean: str | Path | None = None, words: str | Path | None = None
) -> tuple[dict, dict]:
    """A checkpoint of our format holding CF's weights, and what was imported (sha1, shapes, mean)."""
    from alexnet2gpu.model.alexnet import AlexNet2GPU, fused_to_towers
    from alexnet2gpu.train.checkpoint import record
    from alexnet2gpu.train.optim import make_optimizer, make_scheduler
    from alexnet2gpu.train.placement import named_optimizer_state

    layers, sha1 = read_caffemodel(weights)
    config = infer_config(layers, weights)
    towers = fused_to_towers(fused_state(layers, config, weights), config)
    mean_rgb = (
        read_mean(mean) if mean is not None else torch.tensor(CAFFE_MEAN_BGR[::-1])[:, None, None].expand(3, 256, 256)
    )
    size = mean_rgb.shape[-1]
    data = DataConfig(
        dataset="imagenet", preset="caffe", stage_size=size, crop_size=config.input_size, **recipe("caffe", "data")
    )
    train = TrainConfig(**recipe("caffe", "train"))
    with torch.random.fork_rng(devices=[]):
        model = AlexNet2GPU(config, devices=("cpu", "cpu"))
    model.load_state_dict(towers)  # every key and shape, as `load` will check them
    optimizer = make_optimizer(model, train)  # no velocities yet: a fine-tune (train --resume) starts from 0
    names = {p: name for name, p in model.named_parameters()}
    provenance = {"source": "caffe", "weights": str(weights), "sha1": sha1}
    provenance["mean"] = str(mean) if mean is not None else f"per channel, BGR {CAFFE_MEAN_BGR}"
    stats = DataStats(mean_rgb.float().contiguous(), IMAGENET_EIGVEC.clone(), IMAGENET_EIGVAL.clone(), provenance)
    classes = read_words(words, config.num_classes) if words is not None else None
    checkpoint = record(
        model=model.state_dict(),
        optimizer=named_optimizer_state(optimizer, names),
        scheduler=make_scheduler(optimizer, train).state_dict(),
        configs={"model": config, "data": data, "train": train},
        stats=stats,
        classes=classes,
        rng={"cpu": torch.get_rng_state()},
    )
    summary = {
        "sha1": sha1,
        "bvlc_alexnet": sha1 == BVLC_ALEXNET_SHA1,
        "conv_channels": list(config.conv_channels),
        "fc_features": list(config.fc_features),
        "num_classes": config.num_classes,
        "mean": provenance["mean"],
    }
    return checkpoint, summary


@contextlib.contextmanager
def claim_out(out: Path, *, overwrite: bool) -> Iterator[None]:
    """Hold the folder `--out` is written into, as a training run would: RUN_DIR/last.pt claims the run
    folder (`RunDir`: a run there is refused, or with `overwrite` removed, logs included); any other name
    takes the folder's lock and refuses an existing file without `overwrite`. A device, FIFO or folder at
    `out` is refused in every case (`files.check_replaceable`)."""
    above = next((p for p in out.parents if os.path.lexists(p)), None)  # the nearest part that exists
    if above is not None and not above.is_dir():
        raise CaffeError(f"--out {out}: {above} is a file, not a folder; choose another --out")
    try:
        files.check_replaceable(out)
    except OSError as error:
        raise CaffeError(f"--out {out} {error.strerror}; name a new checkpoint file") from None
    if out.name == "last.pt":
        with RunDir(out.parent, overwrite=overwrite):
            yield
        return
    if os.path.lexists(out) and not overwrite:
        raise CaffeError(f"--out {out} exists; choose another name, or pass --overwrite to replace it")
    held = contextlib.ExitStack()
    try:
        held.enter_context(files.holding(out.parent))
    except OSError as error:
        raise CaffeError(f"cannot write in {out.parent}: {error.strerror}; choose another --out") from None
    except files.Busy as busy:
        raise CaffeError(
            f"{out.parent} is in use by {busy.holder}; wait for it to end or choose another --out"
        ) from None
    with held:
        yield
