"""Bad input a user can fix ends in one line on stderr and a non-zero exit, on every command: a
path the user named is used or refused, never replaced; a number is reported only if it means
something; a checkpoint that does not fit is named with what does not fit."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import CPU

from alexnet2gpu.cli import main
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.datasets import InMemory, find_idx
from alexnet2gpu.data.stats import DataStats
from alexnet2gpu.data.transforms import input_pipeline
from alexnet2gpu.model.alexnet import build_model
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.errors import EvaluationError
from alexnet2gpu.train.evaluate import evaluate

# two towers of a few channels: every layer of the paper's net, built and run in milliseconds
TINY = AlexNetConfig(num_classes=10, init="he", conv_channels=(4, 4, 4, 4, 4), fc_features=(8, 8))
FAKE = DataConfig(dataset="fake", preset="seed")
PAPER_FAKE = AlexNetConfig(num_classes=10, init="he")  # what `train --dataset fake --init he` builds
TRAIN_FAKE = ["train", "--dataset", "fake", "--preset", "seed", "--init", "he", "--devices", "cpu", "--no-tensorboard"]


def fails(capsys, argv: list[str], pattern: str, *, alone: bool = True) -> str:
    """Run the CLI: it must exit with 2 and print one error line matching `pattern`; with `alone`,
    nothing else on stderr (without, progress bars and notices may come before it)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    if alone:
        assert err == errors[0] + "\n", err
    return errors[0]


def write_checkpoint(path: Path, model: AlexNetConfig = TINY, data: DataConfig = FAKE, weights=None, **changes) -> Path:
    """A checkpoint as `train` writes it (without optimizer state), for a network of `model`."""
    state = weights if weights is not None else build_model(model, CPU).state_dict()
    checkpoint = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"params": []}]},  # no velocities yet, as import-caffe's
        "scheduler": {},
        "rng": ckpt.rng_state(),
        "step": 1,
        "epoch": 0,
        "batch": 1,
        "best_val_top1": math.inf,
        "stats": None,
        "config": {"model": model.to_dict(), "data": data.to_dict(), "train": TrainConfig().to_dict()},
        **changes,
    }
    torch.save(checkpoint, path)
    return path


def stats_of(mean: torch.Tensor) -> dict:
    return {"mean": mean, "eigvec": torch.eye(3), "eigval": torch.full((3,), 0.05)}


def write_idx_folder(folder: Path, train: int, val: int) -> Path:
    """The four IDX files of an MNIST-like set with `train` and `val` blank 28x28 images."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", val)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 28, 28) + bytes(n * 784)
        )
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + bytes(n))
    return folder


# ---------------------------------------------------------------------------------------------
# principle 4: a path the user named is used, or refused; never replaced by another copy


def test_train_data_typo_is_refused_not_replaced_by_the_system_copy(tmp_path: Path, capsys) -> None:
    typo = tmp_path / "typo"
    argv = ["train", "--dataset", "fashion-mnist", "--data", str(typo), "--devices", "cpu", "--out", str(tmp_path)]
    fails(capsys, argv, rf"fashion-mnist not found: --data {re.escape(str(typo))} does not exist; fix the path")
    assert not (tmp_path / "last.pt").exists()


def test_a_data_folder_without_the_idx_files_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    argv = ["fit-stats", "--dataset", "fashion-mnist", "--data", str(tmp_path)]
    fails(capsys, argv, rf"looked in {re.escape(str(tmp_path))} and .*, which lack train-labels-idx1-ubyte\[.gz\]")


@pytest.mark.parametrize(
    "command",
    [
        ["fit-stats", "--dataset", "fashion-mnist", "--data"],
        ["bench", "--data", "--dataset", "mnist", "--data-dir"],
    ],
)
def test_fit_stats_and_bench_refuse_a_data_typo(tmp_path: Path, capsys, command: list[str]) -> None:
    fails(capsys, [*command, str(tmp_path / "typo")], rf"--data {re.escape(str(tmp_path / 'typo'))} does not exist")


def test_bench_data_dir_without_the_data_bench_is_refused(tmp_path: Path, capsys) -> None:
    fails(capsys, ["bench", "--data-dir", str(tmp_path)], "read by the data bench only: add --data")


def test_evaluate_data_typo_is_refused(tmp_path: Path, capsys) -> None:
    model = AlexNetConfig.seed_mnist(conv_channels=(4, 4, 4, 4, 4), fc_features=(8, 8), init="he")
    path = write_checkpoint(tmp_path / "last.pt", model, DataConfig(dataset="fashion-mnist", preset="seed"))
    typo = tmp_path / "typo"
    fails(
        capsys, ["evaluate", "--checkpoint", str(path), "--data", str(typo)], f"--data {re.escape(str(typo))} does not"
    )


def test_evaluate_names_a_training_folder_that_is_gone(tmp_path: Path, capsys) -> None:
    model = AlexNetConfig.seed_mnist(conv_channels=(4, 4, 4, 4, 4), fc_features=(8, 8), init="he")
    gone = str(tmp_path / "moved")
    path = write_checkpoint(tmp_path / "last.pt", model, DataConfig(dataset="mnist", data=gone, preset="seed"))
    fails(capsys, ["evaluate", "--checkpoint", str(path)], f"in {re.escape(gone)}, which is not here: pass --data")


def test_mnist_like_images_of_another_size_than_the_runs_are_refused(tmp_path: Path, capsys) -> None:
    """A run trained on 28x28 images evaluated (or resumed) on 20x20 ones: its mean image would be
    stretched over them and an error rate of other images reported."""
    model = AlexNetConfig.one_gpu(num_classes=10, in_channels=1, init="he", conv_channels=(4,) * 5, fc_features=(8, 8))
    data = DataConfig(dataset="mnist", data=str(tmp_path / "mnist"), preset="paper")
    mean = {"mean": torch.full((1, 28, 28), 30.0), "eigvec": torch.eye(1), "eigval": torch.full((1,), 0.1)}
    path = write_checkpoint(tmp_path / "last.pt", model, data, stats=mean)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for prefix, n in (("train", 8), ("t10k", 4)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 20, 20) + bytes(n * 400)
        )
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + bytes(n))
    said = r"holds 20x20 images, but .*last.pt was trained on 28x28 ones; use the dataset it was trained on"
    fails(capsys, ["evaluate", "--checkpoint", str(path), "--devices", "cpu"], said)
    fails(capsys, ["train", "--resume", str(path), "--devices", "cpu", "--no-tensorboard"], said, alone=False)


def test_the_fake_dataset_refuses_a_data_folder(tmp_path: Path, capsys) -> None:
    fails(
        capsys, [*TRAIN_FAKE, "--data", str(tmp_path)], "--data .*: expected no folder: the fake dataset is generated"
    )


def test_mnist_is_downloaded_only_into_data_without_data_flag(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    roots = []

    def download(root, download):
        roots.append(root)
        write_idx_folder(Path(root) / "MNIST/raw", 1, 1)

    monkeypatch.setattr(torchvision.datasets, "MNIST", download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="mine and .*, which hold none of its four IDX files"):
        find_idx("mnist", "mine")
    assert roots == []  # nothing was written into the folder the user named
    assert find_idx("mnist", None) == Path("data/MNIST/raw") and roots == ["data"]
    assert find_idx("mnist", "data/MNIST/raw") == Path("data/MNIST/raw")  # and, once there, found by name


@pytest.mark.parametrize("had_data", [False, True])
def test_a_failed_download_leaves_no_empty_folders(tmp_path: Path, monkeypatch, had_data: bool) -> None:
    """torchvision makes ./data/MNIST/raw before it fails to reach the network: the folders the attempt
    made are removed with the error, a ./data that was there before stays, and so does a partial file."""
    import torchvision.datasets

    def unreachable(root, download):
        (Path(root) / "MNIST/raw").mkdir(parents=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", unreachable)
    monkeypatch.chdir(tmp_path)
    if had_data:
        (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match=r"mnist not found: .*download into ./data failed \(RuntimeError\)"):
        find_idx("mnist", None)
    assert [p.name for p in tmp_path.iterdir()] == (["data"] if had_data else [])
    assert not had_data or not any((tmp_path / "data").iterdir())

    def partly(root, download):
        (Path(root) / "MNIST/raw").mkdir(parents=True)
        (Path(root) / "MNIST/raw/train-images-idx3-ubyte.gz").write_bytes(b"half")
        raise RuntimeError("cut off")

    monkeypatch.setattr(torchvision.datasets, "MNIST", partly)
    with pytest.raises(DatasetError, match="download into ./data failed"):
        find_idx("mnist", None)
    assert (tmp_path / "data/MNIST/raw/train-images-idx3-ubyte.gz").read_bytes() == b"half"


# ---------------------------------------------------------------------------------------------
# principle 5: a number is reported only if it means something; flags take meaningful values


@pytest.mark.parametrize("net", [["--net", "seed"], ["--no-lrn"], ["--net", "one-gpu"]])
def test_an_lrn_across_the_towers_needs_two_towers_and_an_lrn(tmp_path: Path, capsys, net: list[str]) -> None:
    fails(capsys, [*TRAIN_FAKE, "--out", str(tmp_path), "--lrn-scope", "all", *net], "lrn_scope|--lrn-scope")
    assert not any(tmp_path.iterdir())


def test_a_batch_past_the_set_is_said_first_and_running_out_of_memory_is_one_line(tmp_path: Path, capsys) -> None:
    """-b past the training set: said before the first batch (every step is the whole set; Fashion-MNIST at
    -b 100000 was a 36 GB batch), and an allocator's failure is one line naming -b, not a traceback."""
    import alexnet2gpu.train.loop as loop

    flags = [*TRAIN_FAKE, "--subset", "16", "--net", "one-gpu", "--val-subset", "8", "--max-steps", "1"]
    main([*flags, "-b", "17", "--out", str(tmp_path / "whole")])
    said = capsys.readouterr()
    assert "note: -b 17 is more than the 16 training images: every step is the whole set" in said.out + said.err
    assert ckpt.load(tmp_path / "whole" / "last.pt")["step"] == 1

    def allocator(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 36000000000 bytes")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_:
        patch.setattr(loop, "train_step", allocator)
        main([*flags, "-b", "8", "--out", str(tmp_path / "big")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err  # a training error, as a NaN loss is
    assert (
        err.splitlines()[-1]
        == "error: out of memory at step 1 (a batch of 8 on cpu): lower -b; no checkpoint was written yet"
    )


def test_cudas_out_of_memory_error_is_recognised_and_others_are_not() -> None:
    """The CUDA caching allocator raises torch.OutOfMemoryError (a RuntimeError, torch/_C's stub); the
    CPU allocator a RuntimeError saying "can't allocate memory". Both are the one line; others pass on."""
    from alexnet2gpu.train.loop import _out_of_memory

    assert _out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not _out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_flags_without_effect_or_past_any_machine_are_refused(tmp_path: Path, capsys) -> None:
    """--dist-timeout without tower processes changed nothing (even nan was taken); -j 10^30 was stored
    and would spawn loader processes until the machine fails."""
    out = ["--out", str(tmp_path / "run")]
    fails(capsys, [*TRAIN_FAKE, *out, "--dist-timeout", "nan"], "--dist-timeout applies to --parallel tower-processes")
    fails(
        capsys, [*TRAIN_FAKE, *out, "-j", str(10**30)], r"-j.* 1000000000000000000000000000000: expected 0 .* to 1024"
    )
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_makes_every_steps_generators() -> None:
    from alexnet2gpu.config import SEED_LIMIT
    from alexnet2gpu.model.layers import dropout_generator

    for step in (0, 10**9):
        assert dropout_generator(SEED_LIMIT - 1, step, 1, torch.device("cpu")).initial_seed() < 2**63


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--lr", "inf", "a finite, positive learning rate"),
        ("--lr", "nan", "a finite, positive learning rate"),
        ("--lr", "0", "a finite, positive learning rate"),
        ("--val-subset", "0", "a positive number of images"),
        ("--subset", "0", "a positive number of images"),
        ("-b", "0", "a positive batch size"),
        ("--epochs", "0", "a positive number of epochs"),
        ("--max-steps", "0", "a positive number of steps"),
        ("--momentum", "1", r"a momentum in \[0, 1\)"),
        ("--momentum", "nan", r"a momentum in \[0, 1\)"),
        ("--wd", "-inf", "a finite weight decay >= 0"),
        ("--warmup-steps", "-1", "0 \\(no warm-up\\) or more steps"),
        ("-j", "-1", "0 \\(decode in this process\\) to 1024 worker processes"),
        ("-p", "0", "a positive number of steps"),
        ("--dropout", "1", r"a probability in \[0, 1\)"),
        ("--seed", "1700000000000000000", r"a seed from 0 to 2\^60 - 1"),
        ("--seed", "-1", r"a seed from 0 to 2\^60 - 1"),
        ("--crop-chunk", "0", r"a positive number of images"),
    ],
)
def test_train_refuses_meaningless_flag_values_naming_the_flag(
    tmp_path: Path, capsys, flag: str, value: str, expected: str
) -> None:
    given = [f"{flag}={value}"] if flag.startswith("--") else [flag, value]  # --wd=-inf: argparse takes -inf for a flag
    line = fails(capsys, [*TRAIN_FAKE, "--out", str(tmp_path), *given], f"expected {expected}")
    assert re.match(rf"error: (\S+/)?{flag}(/\S+)? {value}", line), line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["-b", "0"], "-b/--batch-size 0: expected a positive batch size"),
        (["--val-subset", "0"], "--val-subset 0: expected a positive number of images"),
        (["-j", "-2"], "-j/--workers -2: expected 0"),
    ],
)
def test_evaluate_refuses_meaningless_flag_values(tmp_path: Path, capsys, args: list[str], pattern: str) -> None:
    path = write_checkpoint(tmp_path / "last.pt")
    fails(capsys, ["evaluate", "--checkpoint", str(path), *args], pattern)


def test_evaluate_of_an_empty_set_is_an_error_not_zero_percent(tmp_path: Path, capsys) -> None:
    folder = write_idx_folder(tmp_path / "idx", train=2, val=0)
    model = AlexNetConfig.seed_mnist(conv_channels=(4, 4, 4, 4, 4), fc_features=(8, 8), init="he")
    path = write_checkpoint(tmp_path / "last.pt", model, DataConfig(dataset="mnist", data=str(folder), preset="seed"))
    fails(capsys, ["evaluate", "--checkpoint", str(path)], "no images to evaluate in mnist val", alone=False)
    with pytest.raises(EvaluationError, match="no images to evaluate in fake val"):
        evaluate(build_model(TINY, CPU), _fake_val(0), input_pipeline(FAKE, None, "cpu", train=False), progress=False)


def _fake_val(n: int) -> InMemory:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return InMemory(images, torch.arange(n) % 10, 10, "fake val")


@pytest.mark.parametrize("ten_crop", [False, True])
def test_a_model_with_nan_weights_is_not_scored(ten_crop: bool) -> None:
    model = build_model(TINY, CPU)
    with torch.no_grad():
        model.tower_b.fc7.weight[0, 0] = math.nan  # one weight: every logit of every image turns NaN
    stats = DataStats(torch.zeros(3, 32, 32), torch.eye(3), torch.ones(3))  # ten-crop needs the paper's pipeline
    pipeline = input_pipeline(DataConfig(dataset="fake") if ten_crop else FAKE, stats, "cpu", train=False)
    with pytest.raises(EvaluationError, match=r"outputs are NaN or inf for (\d+) of \1 images"):
        evaluate(model, _fake_val(6), pipeline, batch_size=40 if ten_crop else 4, ten_crop=ten_crop, progress=False)


def test_evaluate_refuses_a_checkpoint_with_nan_weights(tmp_path: Path, capsys) -> None:
    weights = build_model(TINY, CPU).state_dict()
    weights["tower_a.conv2.bias"][1] = math.inf
    path = write_checkpoint(tmp_path / "nan.pt", weights=weights)
    fails(
        capsys, ["evaluate", "--checkpoint", str(path)], r"NaN or inf in 1 of its weight tensors \(tower_a.conv2.bias\)"
    )


# ---------------------------------------------------------------------------------------------
# principle 7: a checkpoint that does not fit is one line naming what does not fit


def test_evaluate_refuses_wrong_shaped_weights_naming_them(tmp_path: Path, capsys) -> None:
    other = AlexNetConfig(num_classes=10, conv_channels=(4, 4, 4, 4, 4), fc_features=(8, 6))
    path = write_checkpoint(tmp_path / "last.pt", weights=build_model(other, CPU).state_dict())
    fails(
        capsys,
        ["evaluate", "--checkpoint", str(path)],
        r"weights do not fit the network \(5 of another shape \(tower_a.fc7.weight \(3, 8\), network \(4, 8\)",
    )


def test_resume_refuses_wrong_shaped_weights_in_one_line(tmp_path: Path, capsys) -> None:
    weights = build_model(TINY, CPU).state_dict()
    weights["surplus.weight"] = weights.pop("tower_b.fc7.bias")
    path = write_checkpoint(tmp_path / "last.pt", PAPER_FAKE, FAKE, weights=weights)
    fails(
        capsys,
        [*TRAIN_FAKE, "--out", str(tmp_path / "runs" / "new" / "run"), "--resume", str(path)],
        r"1 missing \(tower_b.fc7.bias\); 1 unexpected \(surplus.weight\); \d+ of another shape",
        alone=False,  # "towers on cpu and cpu ..." comes first
    )
    assert not (tmp_path / "runs").exists()  # a start refused before any step leaves no empty run behind


def test_a_resume_that_fails_keeps_the_directory_it_did_not_create(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    fails(capsys, [*TRAIN_FAKE, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "none.pt")], "none.pt")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    fails(capsys, [*TRAIN_FAKE, "--out", str(tmp_path / "empty"), "--resume", str(tmp_path / "none.pt")], "none.pt")
    assert (tmp_path / "empty").is_dir()  # made by the user, not by the run


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda c: c.pop("config"), "not an alexnet2gpu checkpoint: it lacks config"),
        (lambda c: c["config"].pop("model"), "its config lacks the model part"),
        (lambda c: c.update(config={"data": {}}), "its config lacks the model, train parts"),
        (lambda c: c["config"]["data"].update(colour=1), r"unknown DataConfig fields \['colour'\]"),
        (lambda c: c["config"]["model"].update(input_size="big"), "its config cannot be used"),
        (lambda c: c.update(model=[1, 2]), "its 'model' entry is not a state dict of tensors"),
        # edited or damaged entries (issue 29): each named, before anything is built from it
        (lambda c: c["config"]["model"].update(conv_channels=[4.0] * 5), r"AlexNetConfig.conv_channels=\(4.0"),
        (lambda c: c["config"]["model"].update(input_size=224.0), "AlexNetConfig.input_size=224.0: expected int"),
        (lambda c: c["config"]["train"].update(seed="x"), "TrainConfig.seed='x': expected int"),
        (lambda c: c.update(step=-5), "its step is -5, not a count of 0 or more"),
        (lambda c: c.update(batch="1"), "its batch is '1', not a count"),
        (lambda c: c.update(rng={"cpu": [1, 2]}), "its rng entry is not the generators' saved state"),
        (
            lambda c: c.update(classes={"ids": ["a", "b", "c"], "names": ["a", "b", "c"]}),
            "names 3 classes, its fc8 has 10",
        ),
        (lambda c: c.update(stats=stats_of(torch.zeros(3, 8, 6))), r"mean image has shape \(3, 8, 6\)"),
        (lambda c: c.update(stats=stats_of(torch.zeros(1, 3, 8, 8))), r"mean image has shape \(1, 3, 8, 8\)"),
        (lambda c: c.update(stats=stats_of(torch.full((3, 8, 8), math.nan))), "mean image is not finite"),
        (
            lambda c: c["model"].update({k: v.long() for k, v in c["model"].items() if k.endswith("conv1.weight")}),
            r"weight tensors are not floating point \(tower_a.conv1.weight \(torch.int64\)\)",
        ),
    ],
)
def test_a_checkpoint_without_a_usable_config_is_one_line(tmp_path: Path, capsys, damage, pattern: str) -> None:
    path = write_checkpoint(tmp_path / "last.pt")
    checkpoint = torch.load(path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, path)
    fails(capsys, ["evaluate", "--checkpoint", str(path)], pattern)


def test_resume_of_a_checkpoint_without_a_model_config_is_one_line(tmp_path: Path, capsys) -> None:
    path = write_checkpoint(tmp_path / "last.pt", PAPER_FAKE, weights={})
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["model"]
    torch.save(checkpoint, path)
    argv = [*TRAIN_FAKE, "--out", str(tmp_path / "run"), "--resume", str(path)]
    fails(capsys, argv, "config lacks the model part", alone=False)


# ---------------------------------------------------------------------------------------------
# principle 7: one line on every command, with workers or without


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path: Path, capsys) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    argv = ["fit-stats", "--dataset", "imagenet", "--data", str(tmp_path), "--strict", "-j", "1"]
    line = fails(capsys, argv, rf"^error: .*{re.escape(str(tmp_path / 'train/cat/0.jpg'))}", alone=False)
    assert "worker" not in line and "Caught" not in line


@pytest.mark.parametrize(
    ("files", "pattern"),
    [
        (None, "no run directory"),
        ({}, "has no train.csv, val.csv or last.pt"),
        ({"notes.txt": "x"}, "has no train.csv, val.csv or last.pt"),
        ({"train.csv": "step,loss\n1,2\n"}, r"train.csv lacks the column\(s\) top1_err"),
        ({"val.csv": "step,loss,top1_err,top5_err\n1,x,0,0\n"}, "val.csv holds a cell that is not a number"),
        ({"train.csv": "step,loss,top1_err\n1,2\n"}, "train.csv holds a row with too few or too many cells"),
    ],
)
def test_plot_of_something_that_is_not_a_run_is_one_line(tmp_path: Path, capsys, files, pattern: str) -> None:
    run = tmp_path / "run"
    if files is not None:
        run.mkdir()
        for name, text in files.items():
            (run / name).write_text(text)
    fails(capsys, ["plot", str(run)], pattern)


def test_plot_in_a_folder_it_cannot_write_is_one_line(tmp_path: Path, capsys, immutable) -> None:
    """A run folder on a read-only disk or made immutable: the figure that cannot be written is named."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.csv").write_text("step,loss,top1_err\n1,2,0.5\n")
    immutable(tmp_path / "run")
    fails(
        capsys, ["plot", str(tmp_path / "run")], r"cannot write .*curves.png: Operation not permitted; make .* writable"
    )


def test_an_error_line_escapes_a_path_from_the_command_line_and_plot_names_a_link_loop(tmp_path: Path, capsys) -> None:
    """A path typed with an escape code (it cleared the terminal in the error line), and a last.pt that
    links to itself (plot drew the curves and skipped the kernels without a word)."""
    line = fails(capsys, ["plot", str(tmp_path / "r\x1b[2Jx")], "no run directory")
    assert "\x1b" not in line and "r\\x1b[2Jx" in line
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.csv").write_text("step,loss,top1_err\n1,2,0.5\n")
    (tmp_path / "run" / "last.pt").symlink_to(tmp_path / "run" / "last.pt")
    fails(
        capsys, ["plot", str(tmp_path / "run")], "cannot open checkpoint .*last.pt: Too many levels of symbolic links"
    )


def test_plot_of_a_checkpoint_without_conv1_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    write_checkpoint(tmp_path / "run" / "last.pt", weights={"fc8.weight": torch.zeros(2, 2)})
    fails(capsys, ["plot", str(tmp_path / "run")], "holds no conv1 weights")


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["train", "--input-size", "225"], r"argument --input-size: invalid choice: 225 .*see .* train --help"),
        (["evaluate"], "the following arguments are required: --checkpoint"),
        (["bench", "--images", "0"], "--images 0: expected a positive number of images"),
        (["bench", "--repeats", "0"], "--repeats 0: expected a positive number of timing rounds"),
        (["bench", "--data", "--device", "cuda:9"], "device cuda:9 does not exist here"),
        (["fit-stats", "--dataset", "fake", "--fit-images", "-1"], "--fit-images -1: expected a positive number"),
    ],
)
def test_usage_errors_are_one_line_on_every_command(capsys, argv: list[str], pattern: str) -> None:
    fails(capsys, argv, pattern)


# ---------------------------------------------------------------------------------------------
# found by a hostile try


@pytest.fixture
def looped_tree(tmp_path: Path, request) -> Path:
    """A small ImageNet tree with a symbolic link to itself (`ln -s loop loop`) where a class folder
    (train/) or an image (in a class folder of each split) belongs."""
    from builders.image_trees import photo_tree

    root = photo_tree(tmp_path / "imagenet", per_class=2)
    for folder in [root / "train"] if request.param == "class" else [root / "train" / "ant", root / "val" / "ant"]:
        (folder / "loop.jpg").symlink_to("loop.jpg")
    return root


@pytest.mark.parametrize("looped_tree", ["class", "image"], indirect=True)
@pytest.mark.parametrize("command", ["train", "evaluate", "stage", "fit-stats"])
def test_a_symbolic_link_loop_in_an_imagenet_folder_is_one_line(
    tmp_path: Path, capsys, monkeypatch, looped_tree: Path, command: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = ["--data", str(looped_tree)]
    tiny = AlexNetConfig(num_classes=3, init="he", conv_channels=(4, 4, 4, 4, 4), fc_features=(8, 8))
    checkpoint = write_checkpoint(tmp_path / "c.pt", tiny, DataConfig(dataset="imagenet", preset="seed"))
    argv = {
        "train": ["train", "--dataset", "imagenet", *data, "--preset", "seed", "--devices", "cpu", "-j", "0"]
        + ["--no-tensorboard", "--out", str(tmp_path / "run")],
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint), *data, "--devices", "cpu", "-j", "0"],
        "stage": ["stage", *data, "--out", str(tmp_path / "staged"), "-j", "0"],
        "fit-stats": ["fit-stats", "--dataset", "imagenet", *data, "-j", "0"],
    }[command]
    fails(capsys, argv, r"loop\.jpg is a symbolic link that loops; remove it or move it out", alone=command != "train")


def test_a_cache_folder_that_cannot_be_written_leaves_the_run_going_without_it(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """As root, permission bits do not stop a write: a cache path under a file does."""
    from builders.image_trees import photo_tree

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file" / "cache"))
    warning = f"warning: cannot cache the data statistics in {tmp_path / 'a-file' / 'cache' / 'alexnet2gpu'}"
    main(["fit-stats", "--dataset", "imagenet", "--data", str(photo_tree(tmp_path / "imagenet", per_class=2))])
    out, err = capsys.readouterr()
    assert '"images": 6' in out and err.count(warning) == 1 and "Traceback" not in err, err
    flags = ["--dataset", "fake", "--init", "he", "--net", "one-gpu", "--devices", "cpu", "--no-tensorboard"]
    main(
        ["train", *flags, "-b", "4", "--subset", "8", "--val-subset", "4", "--max-steps", "1"]
        + ["--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert err.count(warning) == 1 and "Traceback" not in err, err
    assert ckpt.load(tmp_path / "run" / "last.pt")["stats"] is not None  # fitted all the same


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_zero_byte_checkpoint_is_one_line(tmp_path: Path, capsys, command: str) -> None:
    (tmp_path / "last.pt").write_bytes(b"")
    empty = str(tmp_path / "last.pt")
    argv = ["evaluate", "--checkpoint", empty] if command == "evaluate" else ["train", "--resume", empty]
    fails(capsys, argv + ["--devices", "cpu"], r"checkpoint .*last\.pt is empty \(0 bytes\)")


def test_a_failed_checkpoint_write_reports_the_space_free_before_it(tmp_path: Path, monkeypatch) -> None:
    """The issue's case: the write filled the disk, and the space was measured after it (0.0 MiB)."""
    import shutil

    free = iter([1000 * 2**20, 0, 0, 0])
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 0, next(free)))

    def full_disk(obj, path) -> None:
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.save({"model": {"w": torch.zeros(2**20)}}, tmp_path / "last.pt")
    message = str(error.value)
    assert "; 1,000.0 MiB was free on its disk before the write, about 4.0 MiB needed" in message, message
    assert "; 0.0 MiB" not in message, message
    assert "RuntimeError: [enforce fail" in message
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint"


@pytest.mark.parametrize("value", ["inf", "1e12", "0", "nan"])
def test_a_collective_timeout_is_a_positive_number_of_minutes_at_most_a_week(tmp_path: Path, capsys, value) -> None:
    argv = [*TRAIN_FAKE, "--out", str(tmp_path), "--parallel", "tower-processes", f"--dist-timeout={value}"]
    fails(capsys, argv, "expected a positive number of minutes, at most a week")


def test_a_resume_refuses_a_velocity_of_another_shape_in_one_line(tmp_path: Path) -> None:
    """Issue 29: an edited optimiser state is named at the resume, not a RuntimeError at the first step."""
    from alexnet2gpu.train import loop

    config = TrainConfig(epochs=2, batch_size=8, max_steps=1, val_subset=8)
    data = DataConfig(dataset="fake", preset="seed", subset=16, workers=0)
    loop.train(TINY, data, config, CPU, tmp_path, progress=False, tensorboard=False)
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    name = "tower_a.conv1.weight"
    checkpoint["optimizer"]["state"][name]["velocity"] = torch.zeros(3, 3)
    torch.save(checkpoint, tmp_path / "last.pt")
    more = TrainConfig(**{**config.to_dict(), "max_steps": 2})
    with pytest.raises(ckpt.CheckpointError, match=rf"optimiser state for {name} is velocity \(3, 3\), the parameter"):
        loop.train(TINY, data, more, CPU, tmp_path, resume=tmp_path / "last.pt", progress=False, tensorboard=False)
