"""`predict`: each file's top 5 through the run's own preprocessing equals the softmax of the model
computed by hand (centre crop, ten crops), for every awkward mode a dataset can hold; unreadable
files are one line each and the others are still classified; bad inputs are one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders.image_trees import awkward_images, photo, unreadable_images
from conftest import CPU, FAKE, SMALL
from PIL import Image

import alexnet2gpu.train.loop as loop
from alexnet2gpu import cli
from alexnet2gpu.analysis.inference import load_trained
from alexnet2gpu.analysis.predict import Prediction, Unreadable, classify, find_images, predict, read_image
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.data.datasets import DEBIAN, FASHION_MNIST, build_dataset
from alexnet2gpu.data.images import stage_image

# tests/test_runs.py's narrow two-tower net: a step takes a fraction of a second
SHORT = TrainConfig(epochs=1, batch_size=8, max_steps=2, val_subset=8, seed=3, log_every=1)


def train(out: Path, data: DataConfig, model: AlexNetConfig = SMALL) -> Path:
    result = loop.train(model, data, SHORT, CPU, out, progress=False, tensorboard=False)
    return Path(result["checkpoint"])


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("fake-run"), FAKE)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """Every awkward mode (palette, alpha, 16-bit, CMYK, EXIF turn, float) and photos of other shapes."""
    folder = tmp_path_factory.mktemp("pictures")
    awkward_images(folder)
    (folder / "more").mkdir()
    Image.fromarray(photo(7, 300, 200)).save(folder / "more" / "wide.jpg", quality=90)
    Image.fromarray(photo(8, 40, 90)).save(folder / "more" / "tall.png")
    (folder / "more" / "notes.txt").write_text("not an image, and not named like one: not listed")
    (folder / ".hidden.png").write_bytes(b"not listed either")
    return folder


def by_hand(trained, path: Path, ten_crop: bool) -> torch.Tensor:
    """The softmax of one file, written out: stage as the fake set is stored (32x32 RGB), the run's
    pipeline, and for ten crops the corners, centre and their mirrors of the 256x256 image (P 4.1)."""
    image = stage_image(path, 32)[None]  # (1, 3, 32, 32)
    with torch.no_grad():
        if not ten_crop:
            return F.softmax(trained.model(trained.pipeline(image)), dim=1)[0]
        staged = trained.pipeline.stage(image)  # (1, 3, 256, 256), mean subtracted unless K12's centre mean
        corners = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
        patches = [staged[..., t : t + 224, s : s + 224] for t, s in corners]
        patches += [p.flip(-1) for p in patches]
        if trained.configs[1].mean_crop == "centre":  # K12: the mean image's centre off every view, as it is
            patches = [p - trained.pipeline.centre_mean for p in patches]
        return F.softmax(trained.model(torch.cat(patches)), dim=1).mean(0)  # (10, classes) -> (classes,)


def check_by_hand(checkpoint: Path, results: list, ten_crop: bool) -> None:
    trained = load_trained(checkpoint, "cpu")
    for result in results:
        probs = by_hand(trained, result.path, ten_crop)
        top = probs.topk(5)
        assert [g.label for g in result.top] == top.indices.tolist(), result.path
        assert [g.probability for g in result.top] == pytest.approx(top.values.tolist(), abs=1e-6), result.path
        assert [g.name for g in result.top] == [f"template {label}" for label in top.indices.tolist()]


def test_top5_is_the_softmax_by_hand(fake_run, pictures):
    """Every awkward mode, in batches of 4 (the last one short)."""
    results = predict(fake_run, [pictures], devices="cpu", batch_size=4)
    names = sorted(p.name for p in pictures.rglob("*") if p.suffix in (".png", ".jpg", ".tif") and p.name[0] != ".")
    assert sorted(r.path.name for r in results) == names
    assert all(isinstance(r, Prediction) for r in results)
    check_by_hand(fake_run, results, ten_crop=False)


def test_ten_crop_is_the_mean_softmax_by_hand(fake_run, pictures):
    files = [pictures / "exif_rotated.png", pictures / "more" / "tall.png", pictures / "palette_transparent.png"]
    results = predict(fake_run, files, devices="cpu", ten_crop=True, batch_size=20)  # two images a batch
    assert [r.path for r in results] == files
    check_by_hand(fake_run, results, ten_crop=True)


def test_fewer_classes_than_asked(fake_run, pictures):
    trained = load_trained(fake_run, "cpu")
    [result] = classify(trained, [pictures / "rgba.png"], top=50)
    assert len(result.top) == 10 and sum(g.probability for g in result.top) == pytest.approx(1, abs=1e-5)


def test_class_names_from_users_files_are_printed_escaped() -> None:
    """Class names come from synset_words.txt or import-caffe's --words: a terminal escape or a newline in
    one is escaped, so it neither recolours the terminal nor forges a probability line."""
    from alexnet2gpu.analysis.predict import Guess

    guess = Guess(label=0, id="n01", name="\x1b[31mred\nfish", probability=0.5)
    lines = str(Prediction(Path("a.png"), (guess,))).splitlines()
    assert lines == ["a.png", "  50.0%  \\x1b[31mred\\nfish (n01)"]


def test_find_images(pictures, tmp_path):
    text = tmp_path / "named.txt"
    text.write_text("named on the command line: tried, whatever its name")
    found = find_images([pictures / "more", text, pictures / "cmyk.jpg"])
    assert found == [pictures / "more" / "tall.png", pictures / "more" / "wide.jpg", text, pictures / "cmyk.jpg"]


# ---------------------------------------------------------------------------------------------
# the command


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        cli.main(["predict", *args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_unreadable_files_are_one_line_each(fake_run, pictures, tmp_path, capsys):
    reasons = unreadable_images(tmp_path)
    good = [pictures / "rgba.png", pictures / "more" / "wide.jpg"]
    code, out, err = run_cli(capsys, "--checkpoint", str(fake_run), "--devices", "cpu", str(tmp_path), *map(str, good))
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == len(reasons), err
    for name, word in reasons.items():
        [line] = [line for line in lines if str(tmp_path / name) in line]
        assert line.startswith("warning: cannot read") and word in line.lower(), line
    blocks = out.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == list(map(str, good))
    assert all(len(b.splitlines()) == 6 for b in blocks) and "%  template " in blocks[0].splitlines()[1]


def test_json(fake_run, pictures, tmp_path, capsys):
    (tmp_path / "text.jpg").write_text("not an image at all")
    args = ["--checkpoint", str(fake_run), "--json", "--ten-crop", "-b", "20", str(pictures / "cmyk.jpg")]
    code, out, err = run_cli(capsys, *args, str(tmp_path / "text.jpg"))
    assert code == 0, err
    result = json.loads(out)
    [prediction] = result["predictions"]
    assert prediction["path"] == str(pictures / "cmyk.jpg") and result["ten_crop"] is True
    assert [set(g) for g in prediction["top5"]] == [{"label", "id", "name", "probability"}] * 5
    assert result["errors"] == [{"path": str(tmp_path / "text.jpg"), "error": result["errors"][0]["error"]}]
    assert "not an image in any format PIL decodes" in result["errors"][0]["error"]


def test_bad_inputs_are_one_line(fake_run, pictures, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp_path / "text.png").write_text("not an image")
    image = str(pictures / "rgba.png")
    cases = {
        ("--checkpoint", str(tmp_path / "missing.pt"), image): "no checkpoint at",
        ("--checkpoint", str(tmp_path / "corrupt.pt"), image): "corrupt.pt",
        ("--checkpoint", str(fake_run), str(tmp_path / "nope.png")): "nope.png does not exist",
        ("--checkpoint", str(fake_run), str(tmp_path / "empty")): "empty holds no image files",
        ("--checkpoint", str(fake_run), str(tmp_path / "text.png")): "no file could be read as an image (1 tried)",
        ("--checkpoint", str(fake_run), "-b", "0", image): "-b/--batch-size 0",
        ("--checkpoint", str(fake_run), "--devices", "tpu:7", image): "tpu:7",
    }
    for args, words in cases.items():
        code, out, err = run_cli(capsys, *args)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (args, err)
        assert words in errors[0], (args, errors[0])


# ---------------------------------------------------------------------------------------------
# a 1-channel run: grey, at the stored 28x28, named as Fashion-MNIST names its classes

FASHION = Path(DEBIAN["fashion-mnist"])


@pytest.mark.skipif(
    not FASHION.is_dir(), reason=f"Fashion-MNIST is not in {FASHION} (apt-get install dataset-fashion-mnist)"
)
@pytest.mark.parametrize("preset", ["k12", "seed"])  # seed: no mean image, the demo's run (make demo)
def test_fashion_mnist_grey(tmp_path, capsys, preset: str):
    data = DataConfig(dataset="fashion-mnist", preset=preset, subset=16, fit_images=64, pixel_scale=1.0, workers=0)
    checkpoint = train(tmp_path / "run", data, dataclasses.replace(SMALL, in_channels=1))
    test = build_dataset("fashion-mnist", "val", str(FASHION))
    stored, label = test[0]  # (1, 28, 28): a "Ankle boot"
    assert FASHION_MNIST[label] == "Ankle boot"
    Image.fromarray(stored[0].numpy()).save(tmp_path / "boot.png")
    rgb = np.repeat(np.kron(stored[0].numpy(), np.ones((2, 2), np.uint8))[..., None], 3, -1)  # 56x56 RGB
    Image.fromarray(rgb).save(tmp_path / "boot_rgb_56.jpg", quality=95)
    assert torch.equal(read_image(tmp_path / "boot.png", 1, 28), stored)  # a saved image reads back exactly
    assert read_image(tmp_path / "boot_rgb_56.jpg", 1, 28).shape == (1, 28, 28)

    trained = load_trained(checkpoint, "cpu")
    with torch.no_grad():
        probs = F.softmax(trained.model(trained.pipeline(stored[None])), dim=1)[0]
    [result, _] = classify(trained, [tmp_path / "boot.png", tmp_path / "boot_rgb_56.jpg"])
    top = probs.topk(5)
    assert [g.label for g in result.top] == top.indices.tolist()
    assert [g.probability for g in result.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert {g.name for g in result.top} <= set(FASHION_MNIST)

    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), str(tmp_path / "boot.png"))
    assert code == 0, err
    names = [line.split("%", 1)[1].strip() for line in out.splitlines()[1:]]
    assert names == [FASHION_MNIST[label] for label in top.indices.tolist()]
    assert not isinstance(result, Unreadable)


def test_names_that_are_not_utf8_or_hold_a_newline_are_printed_escaped(fake_run: Path, tmp_path: Path) -> None:
    """Issue 29: a Latin-1 name and a name holding a newline, under a strict UTF-8 stdout: every file is
    classified, each name printed on one line with its odd bytes escaped, no line forged."""
    import os
    import subprocess
    import sys

    folder = os.fsencode(tmp_path)
    for name in (b"caf\xe9.png", b"two\nlines.png"):
        Image.fromarray(photo(9, 40, 40)).save(os.path.join(folder, name).decode("utf-8", "surrogateescape"))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    command = [sys.executable, "-m", "alexnet2gpu", "predict", "--checkpoint", str(fake_run), str(tmp_path)]
    out = subprocess.run(command, capture_output=True, env=env, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    text = out.stdout.decode()
    assert f"{tmp_path}/caf\\xe9.png" in text and f"{tmp_path}/two\\nlines.png" in text
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2 and all(len(block.splitlines()) == 6 for block in blocks)  # a name and 5 guesses


@pytest.mark.parametrize("output", ["closed-early", "full", "closed", "ascii"])
def test_an_output_that_fails_or_goes_away_is_no_traceback(fake_run: Path, tmp_path: Path, output: str) -> None:
    """`predict ... | head -1` stops quietly (exit 141, as a shell tool); `> /dev/full` is one error line;
    an ASCII-only stdout gets a UTF-8 name (café) escaped, every file classified."""
    import os
    import subprocess
    import sys

    Image.fromarray(photo(9, 40, 40)).save(tmp_path / "café.png")
    for k in range(300):  # more output than a pipe's buffer holds: the reader leaves while predict writes
        os.symlink(tmp_path / "café.png", tmp_path / f"copy{k}.png")
    command = [sys.executable, "-m", "alexnet2gpu", "predict", "--checkpoint", str(fake_run), "-b", "64"]
    env, cwd = {**os.environ}, Path(__file__).parents[1]
    if output == "closed-early":
        reader = subprocess.Popen([*command, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
        first = reader.stdout.readline()
        reader.stdout.close()  # the reader goes away, as `head -1` does
        err = reader.stderr.read().decode()
        assert reader.wait(timeout=300) == 141 and first.endswith(b".png\n"), err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        return
    if output == "full":
        with open("/dev/full", "w") as full:
            done = subprocess.run([*command, str(tmp_path)], stdout=full, stderr=subprocess.PIPE, cwd=cwd, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: cannot write to standard output (No space")
        return
    if output == "closed":
        done = subprocess.run(
            [*command, str(tmp_path / "café.png")],
            stdout=None,
            stderr=subprocess.PIPE,
            cwd=cwd,
            text=True,
            pass_fds=(),
            preexec_fn=lambda: os.close(1),
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: cannot write to standard output (it is closed)")
        return
    env["PYTHONIOENCODING"] = "ascii:strict"
    done = subprocess.run([*command, str(tmp_path / "café.png")], capture_output=True, env=env, cwd=cwd, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.splitlines()[0] == f"{tmp_path}/caf\\xe9.png" and len(done.stdout.splitlines()) == 6


def test_stage_and_fit_stats_take_a_latin1_name(tmp_path: Path) -> None:
    import os

    from builders.image_trees import photo_tree

    from alexnet2gpu.data import staging
    from alexnet2gpu.data.datasets import datasets_for
    from alexnet2gpu.data.stats import load_or_fit

    root = photo_tree(tmp_path / "imagenet", classes=("ant", "bee"), per_class=2)
    first = next((root / "train" / "ant").iterdir())
    os.rename(first, os.path.join(os.fsencode(first.parent), b"caf\xe9.jpg"))
    staging.stage(root, tmp_path / "staged", progress=False)
    data = DataConfig(dataset="imagenet", data=str(root), workers=0)
    stats = load_or_fit(datasets_for(data, "train"), name="imagenet", data=data.data, stage_size=256, limit=None)
    assert torch.isfinite(stats.mean).all()
