"""`python -m alexnet2gpu COMMAND`: train, evaluate, plot, bench, fit-stats.

Errors a user can fix (missing data, a device that does not exist, a bad checkpoint) are one line
on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from alexnet2gpu.checkpoint import CheckpointError
from alexnet2gpu.config import BIAS_RULES, DATASETS, INITS, AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.datasets import DatasetError
from alexnet2gpu.devices import DeviceError, resolve_devices

USER_ERRORS = (DatasetError, DeviceError, CheckpointError, ValueError, FileNotFoundError)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="imagenet", choices=DATASETS)
    p.add_argument("--data", default=None, metavar="DIR", help="dataset folder (default: the dataset's usual places)")
    p.add_argument(
        "--preset", default="paper", choices=["paper", "seed"], help="paper: P 2, 4.1; seed: resize+normalise"
    )
    p.add_argument("--subset", type=int, default=None, metavar="N", help="first N training images, for short runs")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("-j", "--workers", type=int, default=4, help="image-decoding processes (ImageNet folders)")
    p.add_argument("--no-pca-noise", action="store_true", help="no PCA colour noise (ablation)")
    p.add_argument(
        "--flip", choices=["auto", "on", "off"], default="auto", help="horizontal flips (auto: not for digits)"
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", type=int, default=224, choices=[224, 227])
    p.add_argument(
        "--net",
        default="two-tower",
        choices=["two-tower", "one-gpu", "seed"],
        help="two-tower: the paper's; one-gpu: its one-GPU comparison net (P 3.2); seed: the seed's",
    )
    p.add_argument("--no-lrn", action="store_true", help="no local response normalisation (ablation)")
    p.add_argument("--pooling", default="overlapping", choices=["overlapping", "non-overlapping"])
    p.add_argument("--activation", default="relu", choices=["relu", "tanh"])
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument(
        "--init",
        default=AlexNetConfig.init,
        choices=INITS,
        help="paper: N(0, 0.01), biases 1 (P 5); caffe: bvlc_alexnet's 0.1 biases; he: He et al. 2015",
    )


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run")
    add_data_args(p)
    add_model_args(p)
    p.add_argument(
        "--devices", default=None, help="tower A,tower B: cuda:0,cuda:1 (default with two GPUs), cuda:0, cpu"
    )
    p.add_argument(
        "--parallel",
        default="devices",
        choices=["devices", "tower-processes"],
        help="devices: both towers in this process; tower-processes: one tower per rank (under torchrun)",
    )
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--lr", "--learning-rate", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=5e-4, dest="weight_decay")
    p.add_argument("--optimizer", default="paper", choices=["paper", "sgd"], help="paper: P 5's update rule")
    p.add_argument(
        "--bias-rule",
        default=TrainConfig.bias_rule,
        choices=BIAS_RULES,
        help="paper: one lr and decay for all (P 5); convnet: biases at 2x lr, no decay (cuda-convnet, CF)",
    )
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up (not in the paper; short runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/alexnet", metavar="RUN_DIR")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps in all (counted across resumes)")
    p.add_argument("--val-subset", type=int, default=None, metavar="N", help="validate on the first N images")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("-p", "--print-freq", type=int, default=10, dest="log_every", help="log every N steps")
    p.add_argument("--no-tensorboard", action="store_true")


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1 / top-5 error of a checkpoint on the validation (test) set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, metavar="DIR", help="dataset folder (default: the one it was trained on)")
    p.add_argument("--devices", default=None)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over ten patches (P 4.1)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--val-subset", type=int, default=None, metavar="N")
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--json", action="store_true")


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG figures of a run: curves and the conv1 kernels of each tower")
    p.add_argument("run_dir")


def add_fit(sub) -> None:
    p = sub.add_parser("fit-stats", help="fit and cache the training set's mean image and PCA")
    add_data_args(p)
    p.add_argument("--fit-images", type=int, default=50_000, help="images to fit on (0: all)")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the models (default) or the data pipeline (--data)")
    p.add_argument("--data", action="store_true", help="benchmark the data pipeline instead of the models")
    p.add_argument("--dataset", default="fashion-mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--device", default=None, help="device to run on (default: cuda:0 when present, else cpu)")
    p.add_argument("--images", type=int, default=3000, help="training images per round of the data bench")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds of the model bench")
    p.add_argument("--profile", default=None, metavar="MODEL", help="print torch.profiler's table for one step")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def data_config(args, **extra) -> DataConfig:
    return DataConfig(
        dataset=args.dataset,
        data=args.data,
        preset=args.preset,
        subset=args.subset,
        strict=args.strict,
        workers=args.workers,
        pca_noise=not args.no_pca_noise,
        flip={"auto": None, "on": True, "off": False}[args.flip],
        **extra,
    )


def model_config(args, num_classes: int, channels: int) -> AlexNetConfig:
    fields = dict(
        num_classes=num_classes,
        in_channels=channels,
        input_size=args.input_size,
        lrn=not args.no_lrn,
        pooling=args.pooling,
        activation=args.activation,
        dropout=args.dropout,
        init=args.init,
    )
    if args.net == "one-gpu":
        return AlexNetConfig.one_gpu(**fields)
    if args.net == "seed":
        return AlexNetConfig.seed_mnist(**{**fields, "lrn": False})
    return AlexNetConfig(**fields)


def cmd_train(args) -> None:
    from alexnet2gpu.datasets import describe
    from alexnet2gpu.engine import train

    data = data_config(args, crop_size=args.input_size)
    model = model_config(args, *describe(data.dataset, data.data))  # classes and channels, images unread
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        bias_rule=args.bias_rule,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        max_steps=args.max_steps,
        val_subset=args.val_subset,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        log_every=args.log_every,
    )
    if args.parallel == "tower-processes":
        from alexnet2gpu.distributed import train_tower_processes

        if config.bias_rule != "paper":
            print("note: tower processes train biases with the weights' rule (--bias-rule paper)", file=sys.stderr)

        result = train_tower_processes(model, data, config, args.out, resume=args.resume)
        if result["rank"] == 0:
            print(json.dumps(result))
        return
    devices = resolve_devices(args.devices)
    print(f"towers on {devices[0]} and {devices[1]}; {model.num_classes} classes; run dir {args.out}", file=sys.stderr)
    result = train(model, data, config, devices, args.out, resume=args.resume, tensorboard=not args.no_tensorboard)
    print(json.dumps({k: result[k] for k in ("step", "epoch", "val", "checkpoint")}))


def cmd_evaluate(args) -> None:
    from alexnet2gpu import checkpoint as ckpt
    from alexnet2gpu.datasets import build_dataset
    from alexnet2gpu.engine import build_model, evaluate, take
    from alexnet2gpu.stats import DataStats
    from alexnet2gpu.transforms import Pipeline

    saved = ckpt.load(args.checkpoint)
    model_cfg = AlexNetConfig.from_dict(saved["config"]["model"])
    data_fields = dict(saved["config"]["data"])
    if args.data:
        data_fields["data"] = args.data
    data = DataConfig(**data_fields)
    devices = resolve_devices(args.devices)
    model = build_model(model_cfg, devices)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{args.checkpoint}: weights do not fit its own config ({str(error)[:200]})") from None
    stats = DataStats.from_dict(saved["stats"]) if saved.get("stats") else None
    val = take(build_dataset(data.dataset, "val", data.data, stage_size=data.stage_size), args.val_subset)
    pipeline = Pipeline(data, stats, next(model.parameters()).device, train=False)
    result = evaluate(model, val, pipeline, batch_size=args.batch_size, ten_crop=args.ten_crop, workers=args.workers)
    result["ten_crop"] = args.ten_crop
    if args.json:
        print(json.dumps(result))
    else:
        how = "ten-crop" if args.ten_crop else "centre crop"
        print(
            f"{data.dataset} val, {result['images']} images, {how}: top-1 error {result['top1_err']:.2%}, "
            f"top-5 error {result['top5_err']:.2%}, loss {result['loss']:.4f}"
        )


def cmd_plot(args) -> None:
    from alexnet2gpu.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)


def cmd_fit(args) -> None:
    from alexnet2gpu.datasets import build_dataset
    from alexnet2gpu.stats import load_or_fit

    data = data_config(args)
    train_set = build_dataset(data.dataset, "train", data.data, stage_size=data.stage_size)
    limit = args.fit_images or None
    stats = load_or_fit(
        train_set, name=data.dataset, data=data.data, stage_size=data.stage_size, limit=limit, workers=data.workers
    )
    print(json.dumps({"eigval": stats.eigval.tolist(), "eigvec": stats.eigvec.tolist(), **stats.provenance}))


def cmd_bench(args) -> None:
    from alexnet2gpu import bench

    if args.data:
        bench.main_data(args)
    else:
        bench.main_models(args)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "plot": cmd_plot, "fit-stats": cmd_fit, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alexnet2gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_evaluate, add_plot, add_fit, add_bench):
        add(sub)
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # a TrainingError, or anything unexpected: one line, exit 1
        from alexnet2gpu.engine import TrainingError

        if not isinstance(error, TrainingError):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
