"""Figure 4 (P 6.1) and TensorBoard's top-5 panel: the neighbours are the nearest in fc7, the
training set's vectors are cached per checkpoint, the images shown are a fixed choice over the
classes, and the figure comes out of a short run on the fake set and on an ImageNet-layout folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders.image_trees import photo_tree
from conftest import CPU, FAKE, SMALL

import alexnet2gpu.train.loop as loop
from alexnet2gpu.analysis import figures
from alexnet2gpu.analysis.inference import features, load_trained
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.data import datasets
from alexnet2gpu.data.datasets import build_dataset
from alexnet2gpu.train import panel
from alexnet2gpu.train.panel import PANEL_IMAGES

SHORT = TrainConfig(epochs=1, batch_size=8, max_steps=2, val_subset=8, seed=3, log_every=1)


def short_run(out: Path, model=SMALL, data=FAKE, tensorboard: bool = False) -> Path:
    loop.train(model, data, SHORT, CPU, out, progress=False, tensorboard=tensorboard)
    return out


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """One short run on the fake set, TensorBoard on, shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        return short_run(tmp_path_factory.mktemp("fake") / "run", tensorboard=True)


class Counting:
    """`features`, counting the images it is given."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, model, x):
        self.images += len(x)
        return features(model, x)


# ---------------------------------------------------------------------------------------------
# which images, which neighbours


def test_nearest_are_the_duplicates_in_order_of_distance() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 32, generator=g) * 10  # far from the queries
    queries = torch.randn(3, 32, generator=g)
    rows = torch.randperm(500, generator=g)[:18].view(3, 6)  # where each query's near copies lie
    for q in range(3):
        for j, row in enumerate(rows[q]):  # copy j lies at distance 0.01 * j
            bank[row] = queries[q] + 0.01 * j * torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    distances, found = figures.nearest(queries, bank.half(), k=6, chunk=64)  # several chunks, merged
    assert torch.equal(found, rows)
    assert torch.allclose(distances, 0.01 * torch.arange(6.0).expand(3, 6), atol=5e-2)
    assert (distances[:, 1:] >= distances[:, :-1]).all()


def test_the_images_shown_are_spread_over_the_classes_and_the_same_every_time() -> None:
    labels = build_dataset("fake", "val").labels  # stored class after class: 0, 1, ..., 9, 0, 1, ...
    chosen = figures.spread(labels, 8)
    assert chosen == figures.spread(labels, 8)
    assert len(set(labels[chosen].tolist())) == 8  # eight classes
    assert chosen != list(range(8)) and max(chosen) > 10  # not the first images
    assert len(set(figures.spread(labels, 13))) == 13 and figures.spread(labels, 13)[:8] == chosen
    sorted_labels = labels.sort().values  # class by class (ImageNet's order): still eight classes
    assert len(set(sorted_labels[figures.spread(sorted_labels, 8)].tolist())) == 8


def test_the_training_vectors_are_cached_and_rebuilt_when_the_checkpoint_changes(fake_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    trained, train = load_trained(run / "last.pt"), build_dataset("fake", "train")
    spy = Counting()
    bank, indices = figures.train_features(trained, train, 40, feature_fn=spy, progress=False)
    assert spy.images == 40 and bank.dtype == torch.float16 and bank.shape == (40, 64)
    assert torch.equal(indices, figures.sample(len(train), 40)) and len(set(indices.tolist())) == 40
    x = trained.pipeline(train.images[indices[:4]])
    assert torch.allclose(bank[:4].float(), features(trained.model, x), rtol=1e-2, atol=1e-2)
    (cache,) = run.glob("last.pt.fc7-*.pt")

    again = figures.train_features(load_trained(run / "last.pt"), train, 40, feature_fn=spy, progress=False)
    assert spy.images == 40  # read from the cache
    assert torch.equal(again[0], bank) and torch.equal(again[1], indices)
    figures.train_features(trained, train, 20, feature_fn=spy, progress=False)
    assert spy.images == 60  # another sample: computed

    stat = (run / "last.pt").stat()
    os.utime(run / "last.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new checkpoint was written
    figures.train_features(load_trained(run / "last.pt"), train, 40, feature_fn=spy, progress=False)
    assert spy.images == 100
    assert not cache.exists() and len(list(run.glob("last.pt.fc7-*.pt"))) == 1  # the stale vectors are gone
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c.update(features=c["features"].flip(0)),  # the same size, other bytes: the checksum
        lambda c: c.update(features=torch.full_like(c["features"], float("nan")), sha256=None),
        lambda c: c.update(features=c["features"][:0], indices=c["indices"][:0]),
        lambda c: c.update(features=c["features"][:, :10]),
        lambda c: c.update(indices=c["indices"] + 10**6),
        lambda c: c.update(indices=c["indices"].flip(0)),  # each vector under another image: the checksum
        lambda c: c.update(indices=torch.cat([c["indices"][:1], c["indices"][:-1]])),  # one image twice
    ],
)
def test_a_damaged_fc7_cache_is_computed_again(fake_run: Path, tmp_path, damage, capsys) -> None:
    """Issue 29: the cache is checked (shape, dtype, finiteness, index range, checksum), not trusted."""
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    trained, train = load_trained(run / "last.pt"), build_dataset("fake", "train")
    bank, indices = figures.train_features(trained, train, 40, progress=False)
    (cache,) = run.glob("last.pt.fc7-*.pt")
    saved = torch.load(cache, weights_only=True)
    damage(saved)
    torch.save(saved, cache)
    spy = Counting()
    again = figures.train_features(trained, train, 40, feature_fn=spy, progress=False)
    assert spy.images == 40 and torch.equal(again[0], bank) and torch.equal(again[1], indices)
    assert "computing them again" in capsys.readouterr().err


def test_an_fc7_cache_that_is_a_fifo_is_computed_again_not_waited_on(fake_run: Path, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    trained, train = load_trained(run / "last.pt"), build_dataset("fake", "train")
    figures.train_features(trained, train, 40, progress=False)
    (cache,) = run.glob("last.pt.fc7-*.pt")
    cache.unlink()
    os.mkfifo(cache)  # its read would wait for a writer forever
    spy = Counting()
    figures.train_features(trained, train, 40, feature_fn=spy, progress=False)
    assert spy.images == 40 and "computing them again" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the figure, from short runs


def test_figure4_of_a_short_fake_run(fake_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    spy = Counting()
    path = figures.figure4(run, neighbours_from=64, feature_fn=spy, progress=False)
    assert path == run / "figure4.png" and path.stat().st_size > 20_000
    assert spy.images == FAKE.subset + figures.QUERIES  # the 16 images the run trained on (issue 29), not 64
    figures.figure4(run, neighbours_from=64, feature_fn=spy, progress=False)
    assert spy.images == FAKE.subset + 2 * figures.QUERIES  # the training images' vectors came from the cache
    figures.figure4(run, neighbours_from=8, feature_fn=spy, progress=False)
    assert spy.images == FAKE.subset + 8 + 3 * figures.QUERIES  # a sample of 8 of them: another cache


def test_figure4_from_the_command_line(fake_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    result = subprocess.run(
        [sys.executable, "-m", "alexnet2gpu", "plot", str(run), "--figure4", "--neighbours-from", "32", "-j", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert str(run / "figure4.png") in result.stdout.splitlines() and (run / "figure4.png").exists()
    assert (run / "curves.png").exists() and len(list(run.glob("last.pt.fc7-*.pt"))) == 1


def test_figure4_on_an_imagenet_folder_finds_a_query_s_duplicate_first(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = photo_tree(tmp_path / "imagenet", classes=("ant", "bee", "cow", "dog"), per_class=2)
    (root / "synset_words.txt").write_text("ant formic, emmet\nbee apis\ncow bovine, moo\ndog canis\n")
    model = AlexNetConfig(num_classes=4, init="he", conv_channels=(8, 8, 8, 8, 8), fc_features=(16, 16))
    data = DataConfig(dataset="imagenet", data=str(root), preset="paper", fit_images=8, pixel_scale=1.0, workers=0)
    run = short_run(tmp_path / "run", model, data)
    val = build_dataset("imagenet", "val", str(root))
    query = figures.spread(figures.labels_of(val), 13)[8 % len(val)]  # figure4's first query
    source, label = val.samples[query]
    shutil.copy(source, root / "train" / val.classes[label] / "zz_copy.jpg")  # a training image equal to it

    path = figures.figure4(run, neighbours_from=None, progress=False)
    assert path.exists() and path.stat().st_size > 20_000
    trained, train = load_trained(run / "last.pt"), build_dataset("imagenet", "train", str(root))
    bank, indices = figures.train_features(trained, train, progress=False)  # cached by figure4
    images, _ = figures.load_images(val, [query])
    distances, rows = figures.nearest(features(trained.model, trained.pipeline(images)), bank)
    assert train.samples[indices[rows[0, 0]]][0].name == "zz_copy.jpg" and distances[0, 0] < 1e-2
    assert trained.categories.short(0) == "formic"


def test_figure4_of_a_caffe_preset_run_reads_squashed_images_as_evaluate_does(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = photo_tree(tmp_path / "imagenet", classes=("ant", "bee", "cow", "dog"), per_class=2)
    model = AlexNetConfig.caffe(num_classes=4, init="he", conv_channels=(8, 8, 8, 8, 8), fc_features=(16, 16))
    data = DataConfig(dataset="imagenet", data=str(root), preset="caffe", crop_size=227, fit_images=8, workers=0)
    run = short_run(tmp_path / "run", model, data)
    real, read = datasets.build_dataset, []

    def spy(name, split, folder=None, **options):
        read.append((split, options["squash"]))
        return real(name, split, folder, **options)

    monkeypatch.setattr(datasets, "build_dataset", spy)
    assert figures.figure4(run, neighbours_from=None, progress=False).exists()
    assert sorted(read) == [("train", True), ("val", True)]  # the whole image, resized, as the run saw it


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_shows_the_top5_panel_at_each_epoch_end(fake_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fake_run / "tb"))
    events.Reload()
    panels = events.Images("val/top5")
    assert [panel.step for panel in panels] == [2] and panels[0].width > 400


def test_a_failing_panel_is_a_warning_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    drawn = []

    def broken(*args, **kwargs):
        drawn.append(args)
        raise RuntimeError("no ink")

    monkeypatch.setattr(panel, "top5_figure", broken)
    short_run(tmp_path / "run", tensorboard=True)
    assert drawn and len(drawn[0][0]) == PANEL_IMAGES
    assert "warning: the top-5 panel was not drawn: RuntimeError: no ink" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").exists()
