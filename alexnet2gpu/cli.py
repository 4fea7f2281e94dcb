"""`python -m alexnet2gpu COMMAND`: train, evaluate, predict, plot, bench, fit-stats, stage, import-caffe.

Errors a user can fix (missing data, a device that does not exist, a bad checkpoint) are one line
on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import signal
import sys
from pathlib import Path

from alexnet2gpu.config import (
    ACTIVATIONS,
    AMPS,
    BIAS_RULES,
    DATASETS,
    DIGIT_DEPARTURES,
    DIGIT_SETS,
    DIST_TIMEOUT,
    DROPOUT_SCALES,
    INITS,
    INPUT_SIZES,
    LR_SCALINGS,
    LRN1_INPUTS,
    LRN_SCOPES,
    MEAN_CROPS,
    OPTIMIZERS,
    PCA_SCALES,
    POOLINGS,
    PRESETS,
    SCHEDULES,
    SEED_BATCH,
    SUBSAMPLINGS,
    WORKERS_LIMIT,
    AlexNetConfig,
    ConfigError,
    DataConfig,
    StageConfig,
    TrainConfig,
    default_batch_size,
    idle_fields,
    recipe,
)
from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.datasets import datasets_for
from alexnet2gpu.devices import DeviceError, resolve_devices, why_no_cuda
from alexnet2gpu.files import CannotWrite, NotRegularFile, shown
from alexnet2gpu.train.checkpoint import CheckpointError
from alexnet2gpu.train.rundir import RunDirError

USER_ERRORS = (
    DatasetError,
    DeviceError,
    CheckpointError,
    RunDirError,
    ValueError,
    FileNotFoundError,
    NotRegularFile,
    CannotWrite,
)

M, D, T, S = AlexNetConfig, DataConfig, TrainConfig, StageConfig  # every default below is one of theirs
FLIPS = {"auto": None, "on": True, "off": False}  # --flip -> DataConfig.flip
FC8S = {"split": True, "tower-a": False}  # --fc8 -> AlexNetConfig.fc8_split
# flags that a preset sets unless given (default None): flag dest -> (config kind, field, value map)
PRESET_FLAGS = {
    "pca_scale": ("data", "pca_scale", None),
    "pca_rescale": ("data", "pca_rescale", None),
    "mean_crop": ("data", "mean_crop", None),
    "crop_chunk": ("data", "crop_chunk", None),
    "lrn1_input": ("model", "lrn1_input", None),
    "spatial_norm": ("model", "spatial_norm", None),
    "fc8": ("model", "fc8_split", FC8S),
    "dropout_scale": ("model", "dropout_scale", None),
    "init": ("model", "init", None),
    "bias_rule": ("train", "bias_rule", None),
    "schedule": ("train", "schedule", None),
}
# flags whose config field has another name (input_size sets the model's input and the data's crop)
FLAG_FIELDS = {"input_size": ("input_size", "crop_size")}
GROUPS = {"data": "data (DataConfig)", "model": "model (AlexNetConfig)", "train": "training (TrainConfig)"}


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(GROUPS["data"])
    g.add_argument(
        "--dataset",
        default=D.dataset,
        choices=DATASETS,
        help="default: %(default)s (P's); make's DATASET default is fashion-mnist, the offline stand-in",
    )
    g.add_argument("--data", default=D.data, metavar="DIR", help="dataset folder (default: the dataset's usual places)")
    g.add_argument(
        "--preset",
        default=D.preset,
        choices=PRESETS,
        help="the source of the whole recipe: k12: the 2012 code's run 145, the paper's network as its authors "
        "trained it (layers-145.cfg, layer-params-145.cfg, convdata_jpeg.py); paper: P's text where it says "
        "otherwise; seed: normalise, resize to 224; caffe: bvlc_alexnet's (256x256 squash, BGR, 227). The flags "
        "marked 'preset' override it one field at a time, and the run's first lines name each departure from "
        "K12 with its source (default: %(default)s)",
    )
    g.add_argument(
        "--subset",
        type=int,
        default=D.subset,
        metavar="N",
        help="N training images, for short runs: the first N of MNIST-like sets, a fixed sample of ImageNet",
    )
    g.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    g.add_argument("-j", "--workers", type=int, default=D.workers, help="image-decoding processes (ImageNet folders)")
    g.add_argument("--gpu-decode", action="store_true", help="decode a staged folder's JPEGs on CUDA (unmeasured)")
    g.add_argument(
        "--no-pca-noise", action="store_false", dest="pca_noise", help="no PCA colour noise (ablation; default: on)"
    )
    g.add_argument(
        "--pca-scale",
        default=None,
        choices=PCA_SCALES,
        help=f"preset: the noise scale, eigenvalue (P 4.1's text) or its square root (K12) (default: {D.pca_scale})",
    )
    g.add_argument(
        "--pca-rescale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"preset: divide the noised crop by 1 + the noise's 0.1 (K12) (default: {D.pca_rescale})",
    )
    g.add_argument(
        "--mean-crop",
        default=None,
        choices=MEAN_CROPS,
        help="preset: the mean image's centre off every crop (K12), or each crop's own region "
        f"(default: {D.mean_crop})",
    )
    g.add_argument(
        "--crop-chunk",
        type=int,
        default=None,
        metavar="N",
        help=f"preset: images sharing one crop offset and flip (K12: 32) (default: {D.crop_chunk}; under k12 "
        f"{DIGIT_DEPARTURES['data']['crop_chunk']} for mnist and fashion-mnist, measured: config.DIGIT_DEPARTURES)",
    )
    g.add_argument(
        "--flip",
        choices=FLIPS,
        default=next(k for k, v in FLIPS.items() if v is D.flip),
        help="horizontal flips (auto: for photographs, not for digits and clothes)",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(GROUPS["model"])
    g.add_argument("--input-size", type=int, default=M.input_size, choices=INPUT_SIZES)
    g.add_argument(
        "--net",
        default="two-tower",
        choices=["two-tower", "one-gpu", "seed"],
        help="two-tower: the paper's; one-gpu: its one-GPU comparison net (P 3.2); seed: the seed's exact one-tower"
        " net (no LRN, 54x54 conv1, a 1000-unit layer before the logits)",
    )
    g.add_argument(
        "--no-lrn", action="store_false", dest="lrn", help="no local response normalisation (ablation; default: on)"
    )
    g.add_argument(
        "--lrn-scope",
        default=M.lrn_scope,
        choices=LRN_SCOPES,
        help="tower: each tower's own maps (P); all: across both towers' channels (Caffe's bvlc_alexnet)",
    )
    g.add_argument(
        "--lrn1-input",
        default=None,
        choices=LRN1_INPUTS,
        help="preset: linear: LRN1 on conv1's output, then pool1, then ReLU (K12); relu: ReLU first (P's text) "
        f"(default: {M.lrn1_input})",
    )
    g.add_argument(
        "--spatial-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"preset: K12's 5x5 normalisation within each map before pool2 (default: {M.spatial_norm})",
    )
    g.add_argument(
        "--fc8",
        default=None,
        choices=FC8S,
        help=f"preset: split: 500 logits per tower (P's Figure 2); tower-a: one fc8 on tower A (K12, C2) "
        f"(default: {next(k for k, v in FC8S.items() if v == M.fc8_split)})",
    )
    g.add_argument(
        "--dropout-scale",
        default=None,
        choices=DROPOUT_SCALES,
        help="preset: test: a bare mask in training, x0.5 at test (P 4.2, K12); train: inverted (C2, CF) "
        f"(default: {M.dropout_scale})",
    )
    g.add_argument("--pooling", default=M.pooling, choices=POOLINGS)
    g.add_argument("--activation", default=M.activation, choices=ACTIVATIONS)
    g.add_argument("--dropout", type=float, default=M.dropout)
    g.add_argument(
        "--init",
        default=None,
        choices=INITS,
        help="preset: k12: N(0, 0.03) for conv3-5, else N(0, 0.01), biases 1 (K12); paper: N(0, 0.01) for all "
        "(P 5); caffe: bvlc_alexnet's 0.1 biases; he: He et al. 2015; "
        f"torch: PyTorch's default (default: the net's own, torch for --net seed, else {M.init})",
    )


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run")
    add_data_args(p)
    add_model_args(p)
    g = p.add_argument_group(GROUPS["train"])
    g.add_argument("--epochs", type=int, default=T.epochs, help="default: %(default)s (K12 run 145's)")
    g.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=None,
        help=f"default {T.batch_size} (P 5); {SEED_BATCH} for mnist and fashion-mnist (the seed's)",
    )
    g.add_argument("--lr", "--learning-rate", type=float, default=T.lr)
    g.add_argument("--momentum", type=float, default=T.momentum)
    g.add_argument("--wd", "--weight-decay", type=float, default=T.weight_decay, dest="weight_decay")
    g.add_argument("--optimizer", default=T.optimizer, choices=OPTIMIZERS, help="paper: P 5's update rule")
    g.add_argument(
        "--bias-rule",
        default=None,
        choices=BIAS_RULES,
        help="preset: paper: one lr and decay for all (P 5's text); convnet: biases at 2x lr, no decay (K12, CF) "
        f"(default: {T.bias_rule})",
    )
    g.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="preset: plateau: lr / 10 when the validation error stops improving (P 5's text); 2012: run 145's "
        f"recorded epochs, scaled to --epochs (K12) (default: {T.schedule})",
    )
    g.add_argument(
        "--warmup-steps", type=int, default=T.warmup_steps, help="linear lr warm-up (not in the paper; short runs)"
    )
    g.add_argument(
        "--lr-scaling",
        default=T.lr_scaling,
        choices=LR_SCALINGS,
        help="none: the lr is --lr whatever -b (P 5); linear: --lr is a batch of 128's, scaled by -b/128 (Goyal 2017)",
    )
    g.add_argument("--seed", type=int, default=T.seed)
    g.add_argument(
        "--max-steps", type=int, default=T.max_steps, help="stop after N steps in all (counted across resumes)"
    )
    g.add_argument(
        "--val-subset",
        type=int,
        default=T.val_subset,
        metavar="N",
        help="validate on N images: the first N of MNIST-like sets, a fixed sample even over ImageNet's classes",
    )
    g.add_argument("--amp", default=T.amp, choices=AMPS)
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true")
    g.add_argument("-p", "--print-freq", type=int, default=T.log_every, dest="log_every", help="log every N steps")
    g.add_argument(
        "--devices", default=T.devices, help="tower A,tower B: cuda:0,cuda:1 (default with two GPUs), cuda:0, cpu"
    )
    g.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=T.tensorboard,
        help="TensorBoard events in RUN_DIR/tb (a resume keeps the run's choice unless given)",
    )
    r = p.add_argument_group("the run")
    r.add_argument(
        "--out", default=None, metavar="RUN_DIR", help="run directory (default: runs/DATASET, as make's OUT)"
    )
    r.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue a run (its options, unless given)")
    r.add_argument("--overwrite", action="store_true", help="start over in a run directory that holds a run")
    r.add_argument(
        "--parallel",
        default="devices",
        choices=["devices", "tower-processes"],
        help="devices: both towers in this process; tower-processes: one tower per rank (under torchrun)",
    )
    r.add_argument(
        "--dist-timeout",
        type=float,
        default=DIST_TIMEOUT,
        metavar="MINUTES",
        help="tower processes: end the run, naming the rank, when one does not answer for this long",
    )


def config_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The flag behind each config field ("batch_size" -> "-b/--batch-size"), read off the commands'
    parsers (train's first), so that a refused value names what the user typed."""
    flags = {}
    for command in parser._subparsers._group_actions[0].choices.values():
        for action in command._actions:
            for field in FLAG_FIELDS.get(action.dest, (action.dest,)):
                flags.setdefault(field, "/".join(action.option_strings))
    return flags


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1 / top-5 error of a checkpoint on the validation (test) set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, metavar="DIR", help="dataset folder (default: the one it was trained on)")
    p.add_argument("--devices", default=None)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over ten patches (P 4.1)")
    p.add_argument("-b", "--batch-size", type=int, default=T.batch_size)
    p.add_argument("--val-subset", type=int, default=None, metavar="N", help="N images, as train's --val-subset")
    p.add_argument("-j", "--workers", type=int, default=None, help="image-decoding processes (default: the run's)")
    p.add_argument("--json", action="store_true")


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="a checkpoint's top-5 classes for image files, through the run's preprocessing")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (walked for image files)")
    p.add_argument(
        "--devices", default=None, help="tower A,tower B (default: the run's own, where this machine has them)"
    )
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over ten patches (P 4.1)")
    p.add_argument(
        "-b", "--batch-size", type=int, default=64, help="network inputs per batch (ten per image with --ten-crop)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object: {"predictions": [{"path", "top5": [{"label", "id", "name", "probability"}]}], '
        '"errors": [{"path", "error"}]}',
    )


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG figures of a run: curves and the conv1 kernels of each tower")
    p.add_argument("run_dir")
    p.add_argument(
        "--figure4",
        action="store_true",
        help="also figure4.png: top-5 predictions and fc7 nearest neighbours on the validation set (P Figure 4)",
    )
    p.add_argument(
        "--neighbours-from",
        type=int,
        default=None,
        metavar="N",
        help="--figure4: search a fixed sample of N of the run's training images (its --subset where it had one; "
        "default 100,000; 0: all); their fc7 is cached",
    )
    p.add_argument("--data", default=None, metavar="DIR", help="--figure4: dataset folder (default: the run's)")
    p.add_argument("--devices", default=None, help="--figure4: where the network runs (default: the run's devices)")
    p.add_argument("-b", "--batch-size", type=int, default=T.batch_size, help="--figure4: images per batch")
    p.add_argument("-j", "--workers", type=int, default=D.workers, help="--figure4: image loading processes")


def add_fit(sub) -> None:
    p = sub.add_parser("fit-stats", help="fit and cache the training set's mean image and PCA")
    add_data_args(p)
    p.add_argument("--fit-images", type=int, default=D.fit_images, help="images to fit on (0: all)")


def add_stage(sub) -> None:
    p = sub.add_parser("stage", help="decode ImageNet once to 256x256 JPEG shards (P 2), for fast reading")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="RAW",
        help="the folder of the official archives (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, "
        "ILSVRC2012_devkit_t12.tar.gz) or those three files, Kaggle's folder, or an ImageFolder tree",
    )
    p.add_argument("--out", required=True, metavar="STAGED", help="a new folder (or an interrupted stage, to resume)")
    p.add_argument("--quality", type=int, default=S.quality, help="JPEG quality (C2's)")
    p.add_argument("--subsampling", default=S.subsampling, choices=SUBSAMPLINGS, help="JPEG chroma; C2's was 4:2:0")
    p.add_argument("-j", "--workers", type=int, default=os.cpu_count(), help="processes (default: one per core)")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the models (default), the data pipeline (--data) or ImageNet staging")
    p.add_argument("--data", action="store_true", help="benchmark the data pipeline instead of the models")
    p.add_argument("--imagenet", action="store_true", help="the live ImageNet folder path against a staged copy")
    p.add_argument("--dataset", default="fashion-mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--device", default=None, help="device to run on (default: cuda:0 when present, else cpu)")
    p.add_argument("--images", type=int, default=None, help="images per round (--data: 3000, --imagenet: 500)")
    p.add_argument("-j", "--workers", type=int, default=None, help="--imagenet: loader processes (default: all cores)")
    p.add_argument("--quality", type=int, default=S.quality, help="--imagenet: JPEG quality of the stage")
    p.add_argument("--subsampling", default=S.subsampling, choices=SUBSAMPLINGS, help="--imagenet: chroma")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds of the model bench")
    p.add_argument("--profile", default=None, metavar="MODEL", help="print torch.profiler's table for one step")
    p.add_argument("--amp", default=T.amp, choices=AMPS)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_import_caffe(sub) -> None:
    p = sub.add_parser(
        "import-caffe", help="Caffe's bvlc_alexnet.caffemodel as a checkpoint of the towers (evaluate, plot, resume)"
    )
    p.add_argument("weights", metavar="WEIGHTS.caffemodel", help="bvlc_alexnet.caffemodel (V1 or new format)")
    p.add_argument(
        "--mean", default=None, metavar="BINARYPROTO", help="imagenet_mean.binaryproto (default: its per-channel mean)"
    )
    p.add_argument("--words", default=None, metavar="TXT", help="synset_words.txt: the classes' WordNet ids and words")
    p.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint to write (RUN_DIR/last.pt for plot)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (and, for RUN_DIR/last.pt, the run's logs)"
    )


def flagged_fields(args, kind: str) -> dict:
    """The fields of `kind` ("model", "data", "train") that preset flags given on the command line set."""
    fields = {}
    for dest, (owner, field, values) in PRESET_FLAGS.items():
        value = getattr(args, dest, None)
        if owner == kind and value is not None:
            fields[field] = values[value] if values else value
    return fields


def preset_fields(args, kind: str) -> dict:
    """The fields of `kind` that the preset sets, with the flags given on top. Under K12's preset the 28x28
    sets take their one measured departure (config.DIGIT_DEPARTURES) unless its flag is given."""
    preset = getattr(args, "preset", "k12")
    digits = DIGIT_DEPARTURES.get(kind, {}) if preset == "k12" and getattr(args, "dataset", None) in DIGIT_SETS else {}
    return {**recipe(preset, kind), **digits, **flagged_fields(args, kind)}


def data_config(args, **extra) -> DataConfig:
    return DataConfig(
        **preset_fields(args, "data"),
        dataset=args.dataset,
        data=args.data,
        preset=args.preset,
        subset=args.subset,
        strict=args.strict,
        workers=args.workers,
        pca_noise=args.pca_noise,
        flip=FLIPS[args.flip],
        gpu_decode=args.gpu_decode,
        **extra,
    )


def model_config(args, num_classes: int, channels: int) -> AlexNetConfig:
    fields = dict(
        num_classes=num_classes,
        in_channels=channels,
        input_size=args.input_size,
        lrn=args.lrn,
        lrn_scope=args.lrn_scope,
        pooling=args.pooling,
        activation=args.activation,
        dropout=args.dropout,
    )
    if args.net == "seed":  # the seed's own net: only the flags given change it, not the preset
        return AlexNetConfig.seed_mnist(**{**fields, **flagged_fields(args, "model"), "lrn": False})
    fields.update(preset_fields(args, "model"))
    if args.net == "one-gpu":  # K12 layers-145-half: the same choices in one tower
        return AlexNetConfig.one_gpu(**fields)
    return AlexNetConfig(**fields)


def train_config(args) -> TrainConfig:
    return TrainConfig(
        **preset_fields(args, "train"),
        epochs=args.epochs,
        batch_size=args.batch_size if args.batch_size is not None else default_batch_size(args.dataset),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        warmup_steps=args.warmup_steps,
        lr_scaling=args.lr_scaling,
        seed=args.seed,
        max_steps=args.max_steps,
        val_subset=args.val_subset,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        log_every=args.log_every,
        devices=args.devices,
        tensorboard=args.tensorboard,
    )


def _given_fields(given: set[str], config) -> dict:
    """The fields of `config` that flags on the command line set, with the flags' values."""
    names = {f.name for f in dataclasses.fields(config)}
    fields = [f for dest in given for f in FLAG_FIELDS.get(dest, (dest,)) if f in names]
    return {f: getattr(config, f) for f in fields}


def resumed_configs(args, given: set[str]) -> tuple[AlexNetConfig, DataConfig, TrainConfig]:
    """A resumed run's options: the checkpoint's, with only the flags given on this command line
    applied on top (the engine refuses those that cannot change mid-run, naming them)."""
    from alexnet2gpu.train import checkpoint as ckpt

    model, data, config = ckpt.read_configs(ckpt.load(args.resume, mmap=True), args.resume)
    data = dataclasses.replace(data, **_given_fields(given, data_config(args, crop_size=args.input_size)))
    config = dataclasses.replace(config, **_given_fields(given, train_config(args)))
    flagged = model_config(args, model.num_classes, model.in_channels)
    model = flagged if "net" in given else dataclasses.replace(model, **_given_fields(given, flagged))
    return model, data, config


def cmd_train(args, given: set[str]) -> None:
    from alexnet2gpu.data.datasets import describe
    from alexnet2gpu.train.loop import train

    if args.resume:
        model, data, config = resumed_configs(args, given)
        if "out" not in given:  # a resumed run goes on in its own directory
            args.out = str(Path(args.resume).parent)
    else:
        data = data_config(args, crop_size=args.input_size)
        model = model_config(args, *describe(data.dataset, data.data))  # classes and channels, images unread
        config = train_config(args)
        args.out = args.out or f"runs/{data.dataset}"
    refuse_idle_flags(given, model, data)
    refuse_out_inside_data(args.out, data)
    options = dict(resume=args.resume, tensorboard=config.tensorboard, overwrite=args.overwrite)
    if "dist_timeout" in given and args.parallel != "tower-processes":
        raise ValueError("--dist-timeout applies to --parallel tower-processes only: leave it out here")
    if args.parallel == "tower-processes":
        from alexnet2gpu.train.launch import train_tower_processes

        timeout_ok = math.isfinite(args.dist_timeout) and 0 < args.dist_timeout <= 10_080
        require("--dist-timeout", args.dist_timeout, timeout_ok, "a positive number of minutes, at most a week")

        if "devices" in given and args.devices:
            raise ValueError(
                "--devices does not apply to --parallel tower-processes: each rank takes the GPU of its LOCAL_RANK"
            )
        result = train_tower_processes(model, data, config, args.out, **options, timeout=args.dist_timeout)
        if result["rank"] == 0:
            print(json.dumps({k: result[k] for k in ("step", "epoch", "val", "checkpoint")}))
        return
    try:
        devices = resolve_devices(config.devices)
    except DeviceError as error:
        if "devices" in given or not args.resume:
            raise
        raise DeviceError(f"{args.resume} was trained with --devices {config.devices}: {error}") from None
    why = why_no_cuda() if devices[0].type == "cpu" and config.devices is None else None
    if why:  # the GPUs are there but this torch cannot use them: say so rather than quietly take the CPU
        print(f"warning: {why}", file=sys.stderr)
    placed = f"towers on {devices[0]} and {devices[1]}" if model.towers == 2 else f"one tower on {devices[0]}"
    print(f"{placed}; {model.num_classes} classes; run dir {args.out}", file=sys.stderr)
    result = train(model, data, config, devices, args.out, **options)
    print(json.dumps({k: result[k] for k in ("step", "epoch", "val", "checkpoint")}))


def refuse_idle_flags(given: set[str], model: AlexNetConfig, data: DataConfig) -> None:
    """A flag given for a field that this net or pipeline never reads (`config.idle_fields`) would be
    stored in the checkpoint and change nothing: refused, naming the flag and why."""
    idle = idle_fields(model, data)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        field = PRESET_FLAGS[action.dest][1] if action.dest in PRESET_FLAGS else action.dest
        if action.dest in given and field in idle:
            flag = "/".join(action.option_strings)
            raise ValueError(f"{flag} changes nothing in this run: {idle[field]}; leave {flag} out")


def refuse_out_inside_data(out: str, data: DataConfig) -> None:
    """A run directory inside an ImageNet folder's train/ or val/ would be read as a class or an image."""
    if data.dataset != "imagenet" or not data.data:
        return
    where = Path(out).resolve()
    for split in ("train", "val"):
        folder = (Path(data.data) / split).resolve()
        if where == folder or where.is_relative_to(folder):
            raise ValueError(
                f"--out {out} is inside {folder}, where its files would be read as images or classes: "
                "put the run directory outside the dataset folder"
            )


def cmd_evaluate(args) -> None:
    from alexnet2gpu.analysis.inference import load_trained
    from alexnet2gpu.data.datasets import check_classes, check_image_size
    from alexnet2gpu.data.sampling import take
    from alexnet2gpu.train import checkpoint as ckpt
    from alexnet2gpu.train.evaluate import evaluate, percent

    TrainConfig(batch_size=args.batch_size, val_subset=args.val_subset)  # -b and --val-subset, checked as train's
    trained = load_trained(args.checkpoint, args.devices or "auto")
    model_cfg, data, _ = trained.configs
    if not args.data and data.data and not Path(data.data).is_dir():
        raise DatasetError(
            f"{args.checkpoint} was trained on {data.dataset} in {data.data}, which is not here: "
            f"pass --data FOLDER with its {data.dataset} validation set"
        )
    workers = args.workers if args.workers is not None else data.workers  # the run's own unless given
    data = dataclasses.replace(data, data=args.data or data.data, workers=workers)
    val = datasets_for(data, "val", host_decode=True)
    check_classes(val, ckpt.categories(trained.checkpoint), model_cfg.num_classes, args.checkpoint)
    check_image_size(val, trained.pipeline.mean, args.checkpoint)
    val = take(val, args.val_subset, stratified=True)
    result = evaluate(
        trained.model, val, trained.pipeline, batch_size=args.batch_size, ten_crop=args.ten_crop, workers=workers
    )
    result["ten_crop"] = args.ten_crop
    if args.json:
        print(json.dumps(result))
    else:
        how = "ten-crop" if args.ten_crop else "centre crop"
        print(
            f"{data.dataset} val, {result['images']} images, {how}: top-1 error {result['top1_err']:.2%}, "
            f"top-5 error {percent(result['top5_err'])}, loss {result['loss']:.4f}"
        )


def cmd_predict(args) -> None:
    """Unreadable files are one line each on stderr and the others are classified; the exit code is
    2 only when no file could be read (after the JSON object, with --json)."""
    from alexnet2gpu.analysis.inference import load_trained
    from alexnet2gpu.analysis.predict import Unreadable, classify, find_images

    require("-b/--batch-size", args.batch_size, args.batch_size > 0, "a positive number of network inputs")
    paths = find_images(args.images)
    trained = load_trained(args.checkpoint, args.devices)
    predictions, errors = [], []
    for result in classify(trained, paths, batch_size=args.batch_size, ten_crop=args.ten_crop):
        if isinstance(result, Unreadable):
            print(f"warning: {result}", file=sys.stderr, flush=True)
            errors.append(result.to_dict())
            continue
        if not args.json:  # one block per image, a blank line between blocks
            print(("\n" if predictions else "") + str(result), flush=True)
        predictions.append(result.to_dict())
    if args.json:
        print(
            json.dumps(
                {"checkpoint": args.checkpoint, "ten_crop": args.ten_crop, "predictions": predictions, "errors": errors}
            )
        )
    if not predictions:
        raise ValueError(f"no file could be read as an image ({len(errors)} tried)")


def cmd_plot(args) -> None:
    from alexnet2gpu.analysis.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    if args.figure4:
        from alexnet2gpu.analysis.figures import NEIGHBOURS_FROM, figure4

        n = args.neighbours_from
        require("--neighbours-from", n, n is None or n >= 0, "a number of images (0: all)")
        require("-b/--batch-size", args.batch_size, args.batch_size > 0, "a positive number of images")
        require("-j/--workers", args.workers, 0 <= args.workers <= WORKERS_LIMIT, "0 to 1024 processes")
        n = NEIGHBOURS_FROM if n is None else (n or None)
        options = dict(neighbours_from=n, data=args.data, devices=args.devices, batch_size=args.batch_size)
        print(figure4(args.run_dir, **options, workers=args.workers))


def cmd_import_caffe(args) -> None:
    from alexnet2gpu import caffe
    from alexnet2gpu.train import checkpoint as ckpt

    checkpoint, summary = caffe.build_checkpoint(args.weights, args.mean, args.words)
    with caffe.claim_out(Path(args.out), overwrite=args.overwrite):
        path = ckpt.save(checkpoint, args.out)
    if summary["bvlc_alexnet"]:
        print(f"{args.weights}: sha1 {summary['sha1']}, the BVLC model zoo's bvlc_alexnet")
    else:
        print(
            f"{args.weights}: sha1 {summary['sha1']} is not bvlc_alexnet's ({caffe.BVLC_ALEXNET_SHA1}); "
            "imported as the network its blobs describe",
        )
    print(
        f"conv {summary['conv_channels']}, fc {summary['fc_features']}, {summary['num_classes']} classes; "
        f"LRN over all channels (across the towers), 227 input, BGR minus the mean ({summary['mean']})"
    )
    print(f"wrote {path}")


def cmd_fit(args) -> None:
    from alexnet2gpu.data.datasets import datasets_for
    from alexnet2gpu.data.stats import load_or_fit

    data = data_config(args, fit_images=args.fit_images or None)
    train_set = datasets_for(data, "train", host_decode=True)
    limit = data.fit_images
    name = data.dataset + ("-squash" if data.squash else "")  # the caffe preset's images: cached apart
    stats = load_or_fit(
        train_set, name=name, data=data.data, stage_size=data.stage_size, limit=limit, workers=data.workers
    )
    print(json.dumps({"eigval": stats.eigval.tolist(), "eigvec": stats.eigvec.tolist(), **stats.provenance}))


def cmd_stage(args) -> None:
    from alexnet2gpu.data.staging import stage

    config = StageConfig(quality=args.quality, subsampling=args.subsampling)
    manifest = stage(args.data, args.out, config, workers=args.workers, strict=args.strict)
    for split, counts in manifest["splits"].items():
        print(
            f"{split}: {counts['images']:,} images of {counts['sources']:,} staged, {len(counts['skipped'])} skipped, "
            f"{counts['bytes'] / 1e9:.2f} GB in {counts['shards']} shards"
        )
    print(f"staged into {args.out} (skipped images and their reasons: {os.path.join(args.out, 'manifest.json')})")


def cmd_bench(args) -> None:
    from alexnet2gpu import bench

    require("--images", args.images, args.images is None or args.images > 0, "a positive number of images")
    require("--repeats", args.repeats, args.repeats > 0, "a positive number of timing rounds")
    if args.data_dir and not args.data:
        raise ValueError(f"--data-dir {args.data_dir} is read by the data bench only: add --data, or drop --data-dir")
    if args.imagenet:
        bench.main_imagenet(args)
        return
    if args.data:
        args.device = str(resolve_devices(args.device)[0]) if args.device else None
        bench.main_data(args)
    else:
        bench.main_models(args)


def require(flag: str, value, ok: bool, expected: str) -> None:
    """Refuse a flag's value that no config field checks, in the words a refused config field gets."""
    if not ok:
        raise ValueError(f"{flag} {value}: expected {expected}")


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "plot": cmd_plot,
    "fit-stats": cmd_fit,
    "bench": cmd_bench,
    "stage": cmd_stage,
    "import-caffe": cmd_import_caffe,
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: its value, unless the help text says it in words (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or not action.option_strings:
            return text
        if action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (its default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def one_line(error: BaseException) -> str:
    """The message of a user error, on one line.

    A flag's refused value names the flag. An exception raised in a DataLoader worker arrives as
    "Caught X in DataLoader worker process N. Original Traceback ..."; its last line holds the
    original message.
    """
    flags = config_flags(build_parser())
    if isinstance(error, ConfigError) and flags.get(error.field):
        return f"{flags[error.field]} {error.value}: expected {error.expected}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Original Traceback" in str(error):
        head, sep, message = lines[-1].partition(": ")  # "alexnet2gpu.data.datasets.DatasetError: ..."
        return message if sep and head.endswith(type(error).__name__) else lines[-1]
    return " ".join(lines) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m alexnet2gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_evaluate, add_predict, add_plot, add_fit, add_bench, add_stage, add_import_caffe):
        add(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        for action in command._actions:  # a flag with no help text still shows its default
            if action.help is None and not any(action.default is x for x in (None, False, argparse.SUPPRESS)):
                action.help = "(default: %(default)s)"
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options written on the command line (not those left at a default)."""
    bare = build_parser()
    for action in bare._subparsers._group_actions[0].choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv))) - {"command"}


class OutputError(OSError):
    """Standard output cannot take what a command prints (a full disk behind `> file`, a dead terminal)."""


class GuardedOutput:
    """`sys.stdout` for the length of a command: a failed write is an OutputError, said in one line by
    `main`, not a traceback from deep inside a print. BrokenPipeError passes as it is: the reader left."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self._guarded(lambda: self.stream.write(text))
        except UnicodeEncodeError:  # an ASCII terminal and a file named café.jpg: escaped, not a traceback
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            escaped = text.encode(encoding, "backslashreplace").decode(encoding)
            return self._guarded(lambda: self.stream.write(escaped))

    def flush(self) -> None:
        self._guarded(lambda: self.stream.flush())

    def _guarded(self, call):
        if self.stream is None:  # started with standard output closed (`>&-`)
            raise OutputError(errno.EBADF, "it is closed")
        try:
            return call()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputError(error.errno, error.strerror) from None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _drop_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's own flush at exit fails no more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pytest's capture has no descriptor
        pass


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    stdout, sys.stdout = sys.stdout, GuardedOutput(sys.stdout)
    try:
        if args.command == "train":
            cmd_train(args, given_flags(parser, argv))
        else:
            COMMANDS[args.command](args)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted; stop quietly, as a shell tool does
        sys.stdout = stdout
        _drop_stdout()
        sys.exit(141)
    except OutputError as error:
        sys.stdout = stdout
        _drop_stdout()
        print(
            f"error: cannot write to standard output ({error.strerror}); free space or print elsewhere", file=sys.stderr
        )
        sys.exit(1)
    except USER_ERRORS as error:  # paths from flags may hold escape codes: printed escaped, as every path is
        print(f"error: {shown(one_line(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a run that stopped on a signal has saved: more signals change nothing now
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(130)
    except Exception as error:  # a TrainingError, or anything unexpected: one line, exit 1
        from alexnet2gpu.train.errors import TrainingError

        if not isinstance(error, TrainingError):
            raise
        print(f"error: {shown(one_line(error))}", file=sys.stderr)
        sys.exit(1)
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    main()
