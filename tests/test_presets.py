"""The recipes a user picks with one flag: K12's run 145 by default (whole on ImageNet, one measured row
apart on the 28x28 sets), P's text, and the run's first line naming every departure with its source."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet2gpu import cli
from alexnet2gpu.config import (
    DIGIT_DEPARTURES,
    SOURCES,
    AlexNetConfig,
    DataConfig,
    TrainConfig,
    departures,
    recipe,
)


def configs(*argv: str) -> tuple[AlexNetConfig, DataConfig, TrainConfig]:
    """The three configs `train` builds from argv, images unread (10 classes, 3 channels)."""
    args = cli.build_parser().parse_args(["train", *argv])
    return cli.model_config(args, 10, 3), cli.data_config(args), cli.train_config(args)


def test_no_flag_is_k12_whole_on_imagenet() -> None:
    model, data, train = configs()
    assert (model, data, train) == (
        AlexNetConfig(num_classes=10),
        DataConfig(),
        TrainConfig(),
    )
    assert (model.lrn1_input, model.spatial_norm, model.init, model.fc8_split, model.dropout_scale) == (
        "linear",
        True,
        "k12",
        False,
        "test",
    )
    assert (data.mean_crop, data.pca_scale, data.pca_rescale, data.crop_chunk) == ("centre", "stdev", True, 32)
    assert (train.bias_rule, train.schedule, train.epochs) == ("convnet", "2012", 91)
    assert departures(model, data, train) == []


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_the_28x28_sets_leave_k12_in_their_one_measured_row_and_a_flag_takes_it_back(dataset: str) -> None:
    model, data, train = configs("--dataset", dataset)
    assert DIGIT_DEPARTURES == {"data": {"crop_chunk": 1}} and data.crop_chunk == 1
    assert departures(model, data, train) == [
        f"crop_chunk=1 (the {dataset} default, measured: config.DIGIT_DEPARTURES)"
    ]
    model, data, train = configs("--dataset", dataset, "--crop-chunk", "32")
    assert data.crop_chunk == 32 and departures(model, data, train) == []
    _, paper, _ = configs("--dataset", dataset, "--preset", "paper")
    assert paper.crop_chunk == 1 and paper.mean_crop == "own"  # P's text, not the measured departure
    assert "crop_chunk=1 (P 4.1's text, C2, CF)" in departures(*configs("--dataset", dataset, "--preset", "paper"))


def test_preset_paper_is_ps_text_in_every_row_and_says_so() -> None:
    model, data, train = configs("--preset", "paper")
    for kind, config in (("model", model), ("data", data), ("train", train)):
        for field, value in recipe("paper", kind).items():
            assert getattr(config, field) == value, field
    said = departures(model, data, train)
    assert len(said) == 10 and all(("P" in line and "(" in line) for line in said), said
    assert "init=paper (P 5's text)" in said and "schedule=plateau (P 5's text)" in said
    # a single flag overrides the preset, and agreeing with K12 leaves that row out
    model, data, train = configs("--preset", "paper", "--schedule", "2012", "--spatial-norm")
    assert train.schedule == "2012" and model.spatial_norm
    assert not any(line.startswith(("schedule=", "spatial_norm=")) for line in departures(model, data, train))


def test_every_departure_has_a_source_and_fields_a_net_lacks_are_left_out() -> None:
    k12 = {f.name: f.default for c in (AlexNetConfig, DataConfig, TrainConfig) for f in dataclasses.fields(c)}
    for field, value in SOURCES:  # each source names a value that is not K12's
        assert field in k12 and value != k12[field], (field, value)
    model, data, train = AlexNetConfig.seed_mnist(), DataConfig(dataset="mnist", preset="seed"), TrainConfig()
    said = departures(model, data, train)  # one tower, no LRN, no crops: no fc8, LRN1 or crop rows
    seed_net = "the seed's network, --net seed"
    assert said == [
        "preset=seed (the seed's pipeline: no crops, mean image or colour noise)",
        *(f"{field} ({seed_net})" for field in ("conv1_padding=none", "dropout_scale=train", "init=torch")),
        *(f"{field} ({seed_net})" for field in ("lrn=False", "spatial_norm=False", "towers=1")),
    ]
    assert departures(AlexNetConfig.one_gpu(), DataConfig(), TrainConfig()) == [
        "towers=1 (one tower: P 3.2's one-GPU net, or the seed's)"
    ]
    ablated = departures(AlexNetConfig(lrn=False), DataConfig(pca_noise=False), TrainConfig())
    assert ablated == [
        "lrn=False (no LRN: P 3.3's ablation, or the seed's network)",
        "pca_noise=False (no colour noise: P 4.1's ablation)",
    ]
    assert "lrn_scope=all (CF)" in departures(AlexNetConfig.caffe(), DataConfig(preset="caffe"), TrainConfig())


def test_a_run_names_its_recipe_in_its_first_lines(tmp_path: Path) -> None:
    flags = ["--dataset", "fake", "--preset", "seed", "--init", "he", "--devices", "cpu", "--no-tensorboard"]
    flags += ["-b", "4", "--subset", "4", "--val-subset", "4", "--max-steps", "1", "-j", "0", "-p", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "alexnet2gpu", "train", *flags, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    said = (result.stdout + result.stderr).splitlines()  # the notices go where the progress bar writes them
    lines = [line for line in said if line.startswith("recipe:")]
    seed = "preset=seed (the seed's pipeline: no crops, mean image or colour noise)"
    assert lines == [f"recipe: K12's run 145, except {seed}; init=he (He et al. 2015)"], said


def test_the_seed_network_changed_by_hand_to_k12s_choice_says_so() -> None:
    """--net seed --spatial-norm: K12's choice on a network that lacks it: the recipe line names it (it
    neither departs from K12 nor is the seed's)."""
    model, data, train = configs("--dataset", "mnist", "--net", "seed", "--preset", "seed", "--spatial-norm")
    assert model.spatial_norm and "spatial_norm=True (set by hand on the seed's network)" in departures(
        model, data, train
    )
    plain = departures(*configs("--dataset", "mnist", "--net", "seed", "--preset", "seed"))
    assert not any("set by hand" in line for line in plain)


@pytest.mark.parametrize(
    ("flags", "flag", "why"),
    [
        (["--net", "one-gpu", "--fc8", "split"], "--fc8", "a one-tower network has no towers to split fc8"),
        (["--no-lrn", "--lrn1-input", "relu"], "--lrn1-input", "the network has no LRN"),
        (["--net", "seed", "--lrn1-input", "linear"], "--lrn1-input", "the network has no LRN"),
        (["--preset", "seed", "--mean-crop", "own"], "--mean-crop", "the seed's pipeline"),
        (["--preset", "seed", "--crop-chunk", "1"], "--crop-chunk", "the seed's pipeline"),
        (["--preset", "seed", "--flip", "on"], "--flip", "the seed's pipeline"),
        (["--preset", "seed", "--no-pca-noise"], "--no-pca-noise", "the seed's pipeline"),
        (["--no-pca-noise", "--pca-scale", "eigenvalue"], "--pca-scale", "the run has no PCA colour noise"),
        (["--no-pca-noise", "--no-pca-rescale"], "--pca-rescale/--no-pca-rescale", "the run has no PCA colour noise"),
        (["--dropout", "0", "--dropout-scale", "train"], "--dropout-scale", "the network has no dropout"),
    ],
)
def test_a_flag_the_net_or_pipeline_never_reads_is_refused(flags: list[str], flag: str, why: str, capsys) -> None:
    """A flag for a field this run does not read would be stored in the checkpoint and change nothing."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--dataset", "fake", "--devices", "cpu", "--out", "/nonexistent/run", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"error: {flag} changes nothing in this run: {why}" in err and f"leave {flag} out" in err


def test_help_names_k12_as_the_source_of_the_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.add_data_args(parser)
    text = " ".join(parser.format_help().split())
    assert "k12: the 2012 code's run 145" in text and "(default: k12)" in text
    assert "under k12 1 for mnist and fashion-" in text and "measured: config.DIGIT_DEPARTURES" in text


def test_refusals_name_k12_among_the_presets() -> None:
    import torch

    from alexnet2gpu.config import ConfigError
    from alexnet2gpu.data.transforms import input_pipeline

    with pytest.raises(ConfigError, match="k12, paper or seed: caffe is for ImageNet"):
        DataConfig(dataset="fake", preset="caffe")
    seed = input_pipeline(DataConfig(dataset="mnist", preset="seed"), None, "cpu", train=False)
    with pytest.raises(ValueError, match=r"ten-crop needs crops \(--preset k12, the default, or paper\)"):
        seed.ten_crops(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_a_crop_chunk_past_the_batch_is_one_draw_for_the_batch() -> None:
    """--crop-chunk larger than any batch (even 10^11) is one offset and flip for the whole batch, not a
    tensor of that many draws."""
    import torch

    from alexnet2gpu.data.stats import DataStats
    from alexnet2gpu.data.transforms import input_pipeline

    stats = DataStats(torch.zeros(3, 40, 40), torch.eye(3), torch.ones(3))
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fields = dict(dataset="fake", stage_size=40, crop_size=32, pca_noise=False, flip=True)
    huge, whole = (DataConfig(**fields, crop_chunk=chunk) for chunk in (10**11, 6))
    out = input_pipeline(huge, stats, "cpu", train=True)(images, torch.Generator().manual_seed(2))
    assert torch.equal(out, input_pipeline(whole, stats, "cpu", train=True)(images, torch.Generator().manual_seed(2)))
