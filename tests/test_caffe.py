"""Caffe's bvlc_alexnet in the towers: caffemodels written here from random weights (tests/builders/caffe_files.py),
imported, and compared with an independent reference written from CF's deploy.prototxt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders.caffe_files import REAL, SMALL, caffe_weights, caffemodel, mean_image, write_mean, write_model
from builders.image_trees import photo, photo_tree
from conftest import rel_diff
from torch import nn

from alexnet2gpu import caffe
from alexnet2gpu.analysis.inference import load_trained
from alexnet2gpu.cli import main
from alexnet2gpu.config import AlexNetConfig, DataConfig
from alexnet2gpu.data.images import stage_image
from alexnet2gpu.data.stats import DataStats
from alexnet2gpu.data.transforms import input_pipeline
from alexnet2gpu.model.alexnet import AlexNet2GPU, AlexNetFused
from alexnet2gpu.model.tower_process import TowerProcess
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.launch import launch

TOL = 1e-5  # float32 through eight layers, grouped and split convolutions summing in other orders
ROOT = Path(__file__).resolve().parents[1]


def reference(weights: dict) -> nn.Sequential:
    """CF models/bvlc_alexnet/deploy.prototxt as one module: grouped conv2, conv4, conv5 (group: 2),
    LRN local_size 5, alpha 1e-4, beta 0.75, k 1 over all channels (Caffe's LRN divides alpha by
    local_size, as nn.LocalResponseNorm), max pooling 3/2 (Caffe rounds pooled sizes up; 55, 27 and 13
    pool exactly, so floor and ceil agree), fc6 reads pool5 flattened as (C, H, W)."""
    (c1, _, _, _), (c2, *_), (c3, *_), (c4, *_), (c5, *_) = (weights[f"conv{i}"][0].shape for i in range(1, 6))
    f6, f7, classes = weights["fc6"][0].shape[0], weights["fc7"][0].shape[0], weights["fc8"][0].shape[0]

    def lrn() -> nn.Module:
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    net = nn.Sequential(
        nn.Conv2d(3, c1, 11, stride=4), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(c1, c2, 5, padding=2, groups=2), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(c5 * 36, f6), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(f6, f7), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(f7, classes),
    )  # fmt: skip
    layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for module, name in zip(
            layers, ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"), strict=True
        ):
            module.weight.copy_(weights[name][0])
            module.bias.copy_(weights[name][1])
    return net.eval()


def caffe_input(rgb: torch.Tensor, mean_bgr: torch.Tensor) -> torch.Tensor:
    """CF's test input, written out: uint8 RGB (N, 3, 256, 256) -> BGR minus the mean image, centre 227 at 14."""
    x = rgb.flip(1).float() - mean_bgr
    return x[:, :, 14 : 14 + 227, 14 : 14 + 227]


def imported(tmp_path: Path, weights: dict, fmt: str = "v1", **options) -> tuple[dict, dict, torch.Tensor]:
    mean = mean_image()
    model = write_model(tmp_path / f"net-{fmt}.caffemodel", weights, fmt, **options)
    return (*caffe.build_checkpoint(model, write_mean(tmp_path / "mean.binaryproto", mean)), mean)


def towers_of(checkpoint: dict, **overrides) -> AlexNet2GPU:
    config = AlexNetConfig(**{**checkpoint["config"]["model"], **overrides})
    model = AlexNet2GPU(config, devices=("cpu", "cpu"))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def images(n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 256, 256), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("fmt", ["v1", "new"])
def test_imported_towers_give_the_prototxt_network_logits(tmp_path: Path, fmt: str) -> None:
    """Both file formats, packed, unpacked and double blobs: the towers (cpu, cpu) and the fused model
    equal the reference; the caffe preset's pipeline makes CF's input from stored RGB images."""
    weights = caffe_weights()
    encodings = {"conv1": "unpacked", "fc8": "double"} if fmt == "new" else None
    checkpoint, summary, mean = imported(tmp_path, weights, fmt, encodings=encodings)
    assert not summary["bvlc_alexnet"] and summary["num_classes"] == SMALL["classes"]
    config = AlexNetConfig(**checkpoint["config"]["model"])
    assert (config.input_size, config.lrn_scope, config.lrn_k) == (227, "all", 1.0)
    data = DataConfig(**checkpoint["config"]["data"])
    assert (data.preset, data.crop_size, data.stage_size) == ("caffe", 227, 256)

    rgb = images()
    pipeline = input_pipeline(data, DataStats.from_dict(checkpoint["stats"]), "cpu", train=False)
    x = pipeline(rgb)
    assert torch.allclose(x, caffe_input(rgb, mean), atol=1e-4)
    with torch.no_grad():
        expected = reference(weights)(x)
        towers = towers_of(checkpoint)(x)
        fused = AlexNetFused.from_towers(towers_of(checkpoint), device="cpu").eval()(x)
    assert rel_diff(towers, expected) < TOL
    assert rel_diff(fused, expected) < TOL


def test_per_tower_lrn_differs_from_caffes_on_the_same_weights(tmp_path: Path) -> None:
    """The paper's LRN (per tower) on CF's weights is another function: the towers must read each
    other's 2 edge channels at LRN1 and LRN2 to give CF's logits."""
    weights = caffe_weights()
    checkpoint, _, mean = imported(tmp_path, weights)
    x = caffe_input(images(), mean)
    with torch.no_grad():
        expected = reference(weights)(x)
        across = rel_diff(towers_of(checkpoint)(x), expected)
        per_tower = rel_diff(towers_of(checkpoint, lrn_scope="tower")(x), expected)
    print(f"relative logit difference from CF's: LRN across the towers {across:.1e}, per tower {per_tower:.1e}")
    assert across < TOL and per_tower > 1e-3


def _tower_worker(rank: int, world: int, tmp: str) -> None:
    setup = torch.load(Path(tmp) / "setup.pt", weights_only=True)
    group = torch.distributed.new_group([0, 1])
    module = TowerProcess(AlexNetConfig(**setup["config"]), rank, group, "cpu").eval()
    module.load_from_towers(setup["state"])
    with torch.no_grad():
        torch.save(module(setup["x"]), Path(tmp) / f"rank{rank}.pt")


def test_imported_towers_in_tower_processes_give_the_same_logits(tmp_path: Path) -> None:
    """One tower per process (gloo): the LRN halo is an all-gather of each tower's edge channels."""
    weights = caffe_weights()
    checkpoint, _, mean = imported(tmp_path, weights)
    x = caffe_input(images(), mean)
    torch.save({"config": checkpoint["config"]["model"], "state": checkpoint["model"], "x": x}, tmp_path / "setup.pt")
    launch(_tower_worker, 2, str(tmp_path))
    with torch.no_grad():
        expected = reference(weights)(x)
    for rank in (0, 1):
        assert rel_diff(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected) < TOL


def test_real_shapes_import(tmp_path: Path) -> None:
    """bvlc_alexnet's shapes (61M weights, a 244 MB file) import into the towers, and give the reference's logits."""
    weights = caffe_weights(**REAL, seed=1)
    model = write_model(tmp_path / "bvlc_alexnet.caffemodel", weights)
    checkpoint, summary = caffe.build_checkpoint(model)  # no --mean: CF's per-channel mean
    assert summary["conv_channels"] == [96, 256, 384, 384, 256] and summary["num_classes"] == 1000
    towers = towers_of(checkpoint)
    assert towers.tower_a.conv2.weight.shape == (128, 48, 5, 5) and towers.tower_b.fc6.weight.shape == (2048, 9216)
    assert torch.equal(towers.tower_b.conv4.weight, weights["conv4"][0][192:])
    assert torch.equal(towers.tower_a.fc8.bias, weights["fc8"][1][:500])
    mean = checkpoint["stats"]["mean"]
    assert mean.shape == (3, 256, 256) and torch.allclose(mean[:, 0, 0], torch.tensor([122.7, 116.7, 104.0]))
    x = caffe_input(images(1), mean.flip(0))
    with torch.no_grad():
        assert rel_diff(towers(x), reference(weights)(x)) < TOL


# ---------------------------------------------------------------------------------------------
# malformed files: one line naming the layer, exit 2


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def malformed(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    weights = caffe_weights()
    good, starts = caffemodel(weights)
    wrong = dict(weights, conv2=(torch.zeros(16, 8, 5, 5), weights["conv2"][1]))  # not grouped: 8 inputs, not 4
    odd_fc = dict(weights, fc6=(torch.zeros(32, 100), weights["fc6"][1]))
    grey = dict(weights, conv1=(weights["conv1"][0][:, :1], weights["conv1"][1]))
    return {
        "text": (b'name: "AlexNet"\nlayer { name: "conv1" }\n', "not a Caffe model"),
        "zip": (b"PK\x03\x04" + bytes(range(64)), "not a Caffe model"),  # a torch checkpoint's first bytes
        "truncated": (good[: starts["fc6"] + 500], "truncated in layer 'fc6'"),
        "no-fc7": (caffemodel(weights, skip=("fc7",))[0], "lacks layer 'fc7'"),
        "conv2-not-grouped": (caffemodel(wrong)[0], "layer 'conv2' has weights of shape (16, 8, 5, 5)"),
        "fc6-wrong-inputs": (caffemodel(odd_fc)[0], "layer 'fc6' has weights of shape (1, 1, 32, 100)"),
        "no-layers": (b"\x0a\x07AlexNet", "holds no layers"),
        # protobuf merges concatenated messages: one NetParameter holding each layer twice, or both formats
        "twice": (good + good, "holds two layers named 'conv1' with weights"),
        "both-formats": (good + caffemodel(weights, "new")[0], "holds layers in both Caffe formats"),
        "grey-conv1": (caffemodel(grey)[0], "layer 'conv1' reads 1 channels; Caffe's AlexNet reads 3 (BGR)"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "text",
        "zip",
        "truncated",
        "no-fc7",
        "conv2-not-grouped",
        "fc6-wrong-inputs",
        "no-layers",
        "twice",
        "both-formats",
        "grey-conv1",
    ],
)
def test_a_malformed_caffemodel_is_one_line(tmp_path: Path, capsys, case: str) -> None:
    data, said = malformed(tmp_path)[case]
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(data)
    err = _refused(["import-caffe", str(path), "--out", str(tmp_path / "out.pt")], capsys)
    assert said in err and str(path) in err and "cannot be read" not in err, err  # not wrapped in another line
    assert not (tmp_path / "out.pt").exists()


def test_a_malformed_mean_or_missing_file_is_one_line(tmp_path: Path, capsys) -> None:
    model = write_model(tmp_path / "net.caffemodel", caffe_weights())
    small = write_mean(tmp_path / "small.binaryproto", torch.zeros(3, 100, 100))
    assert "expected (1, 3, S, S)" in _refused(["import-caffe", str(model), "--mean", str(small), "--out", "x"], capsys)
    cut = tmp_path / "cut.binaryproto"
    cut.write_bytes(write_mean(tmp_path / "m", mean_image()).read_bytes()[:5000])
    assert "truncated" in _refused(["import-caffe", str(model), "--mean", str(cut), "--out", "x"], capsys)
    assert "no Caffe model at" in _refused(["import-caffe", str(tmp_path / "none"), "--out", "x"], capsys)
    for name, value, said in (
        ("nan", float("nan"), "with not finite values;"),
        ("inf", float("inf"), "with not finite values;"),  # not "values from 94 to 3.40282e+38"
        ("huge", -1e30, "with values from -1e+30 to"),
    ):
        bad = mean_image().clone()
        bad[0, 5, 5] = value
        path = write_mean(tmp_path / f"{name}.binaryproto", bad)
        err = _refused(["import-caffe", str(model), "--mean", str(path), "--out", str(tmp_path / "x.pt")], capsys)
        assert "a mean of 8-bit pixels lies in 0..255" in err and said in err, err
    (tmp_path / "a-file").write_text("mine")
    under = str(tmp_path / "a-file" / "run" / "last.pt")
    assert "a-file is a file, not a folder" in _refused(["import-caffe", str(model), "--out", under], capsys)
    assert (tmp_path / "a-file").read_text() == "mine" and not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------------------
# the commands: import, plot (Figure 3), evaluate as the README writes them


def test_figure_3_from_an_imported_checkpoint(tmp_path: Path, capsys) -> None:
    model = write_model(tmp_path / "net.caffemodel", caffe_weights())
    main(["import-caffe", str(model), "--out", str(tmp_path / "run" / "last.pt")])
    out = capsys.readouterr().out
    assert "is not bvlc_alexnet's" in out and "per channel" in out
    main(["plot", str(tmp_path / "run")])
    assert (tmp_path / "run" / "conv1_kernels.png").stat().st_size > 1000


def test_readme_commands_run_end_to_end(tmp_path: Path) -> None:
    """`import-caffe` then `evaluate` (centre crop and ten-crop) as separate processes, on a generated
    caffemodel of 3 classes and an ImageNet-layout folder; evaluate's loss is the reference's on CF's input."""
    classes = ("n01440764", "n01443537", "n01484850")
    tree = photo_tree(tmp_path / "imagenet", classes=classes)
    (tmp_path / "synset_words.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    weights = caffe_weights(classes=3)
    mean = mean_image()
    model = write_model(tmp_path / "bvlc_alexnet.caffemodel", weights)
    write_mean(tmp_path / "imagenet_mean.binaryproto", mean)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "alexnet2gpu", *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    ckpt_path = tmp_path / "runs" / "bvlc_alexnet" / "last.pt"
    out = run(
        "import-caffe", str(model), "--mean", str(tmp_path / "imagenet_mean.binaryproto"),
        "--words", str(tmp_path / "synset_words.txt"), "--out", str(ckpt_path),
    )  # fmt: skip
    assert f"wrote {ckpt_path}" in out
    result = json.loads(
        run("evaluate", "--checkpoint", str(ckpt_path), "--data", str(tree), "--devices", "cpu", "--json")
    )
    ten = json.loads(
        run("evaluate", "--checkpoint", str(ckpt_path), "--data", str(tree), "--devices", "cpu", "--json", "--ten-crop")
    )
    assert result["images"] == ten["images"] == 6 and ten["ten_crop"]

    files = sorted((tree / "val").glob("*/*"))
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    rgb = torch.stack([stage_image(f, 256, squash=True) for f in files])
    with torch.no_grad():
        logits = reference(weights)(caffe_input(rgb, mean))
    loss = nn.functional.cross_entropy(logits, labels).item()  # evaluate's loss: the cross-entropy
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["top1_err"] == pytest.approx((logits.argmax(1) != labels).float().mean().item())

    trained = load_trained(ckpt_path, "cpu")
    assert trained.categories.names == ("tench", "goldfish", "great white shark")
    assert ckpt.categories(trained.checkpoint).ids == classes


@pytest.mark.parametrize(
    ("width", "height"),
    [(500, 375), (333, 500), (1024, 683), (512, 512), (257, 255), (200, 130), (120, 90), (31, 47), (1, 1)],
)
def test_squash_equals_opencvs_resize_to_the_bit(tmp_path: Path, width: int, height: int) -> None:
    """The caffe preset's resize is CF's convert_imageset's, cv::resize INTER_LINEAR on 8-bit pixels,
    to the bit: photos down and up (512x512 is OpenCV's exact-halving case), the whole image squashed
    to 256x256 (aspect ratio not kept), where P's keeps the centre square. A float bilinear resize
    misses OpenCV by a grey level in some of the values, which this test would see."""
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is a test dependency (setup.cfg [dev])")
    from PIL import Image

    array = photo(width * height, width, height)
    Image.fromarray(array).save(tmp_path / "photo.png")
    squashed = stage_image(tmp_path / "photo.png", 256, squash=True).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(squashed, cv2.resize(array, (256, 256), interpolation=cv2.INTER_LINEAR))
    if (width, height) != (256, 256) and width != height:
        assert not np.array_equal(squashed, stage_image(tmp_path / "photo.png", 256).permute(1, 2, 0).numpy())


def test_squash_differs_from_a_float_bilinear_resize_where_opencv_does(tmp_path: Path) -> None:
    """The integer arithmetic matters: on a photo, a float bilinear resize rounds a grey level apart
    from OpenCV's 11-bit weights in a share of the values (so a float resize would fail the test above)."""
    from alexnet2gpu.data.images import opencv_linear

    array = photo(7, 500, 375)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float()
    floated = nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)[0]
    floated = floated.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    differ = np.abs(opencv_linear(array, 256, 256).astype(int) - floated)
    assert differ.max() == 1 and 0.01 < (differ > 0).mean() < 0.5


def test_a_staged_folder_refuses_the_caffe_preset(tmp_path: Path) -> None:
    """Staged folders hold P 2's centre squares, not CF's squashed images: refused in one line."""
    from alexnet2gpu.data.base import DatasetError
    from alexnet2gpu.data.datasets import build_dataset
    from alexnet2gpu.data.staged import MANIFEST

    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / MANIFEST).write_text("{}")
    with pytest.raises(DatasetError, match="the caffe preset squashes whole images"):
        build_dataset("imagenet", "val", str(tmp_path / "staged"), squash=True)


def test_caffe_preset_training_crops_are_the_papers_in_bgr() -> None:
    """Fine-tuning (train --resume of an import): the same random crops, flips and PCA colour noise as
    the paper's pipeline draws, the noise turned with the channels into BGR."""
    stats = DataStats(mean_image().flip(0), torch.eye(3), torch.tensor([0.2, 0.02, 0.004]))
    rgb = images(4)
    common = dict(dataset="imagenet", crop_size=227)
    paper = input_pipeline(DataConfig(**common), stats, "cpu", train=True)(rgb, torch.Generator().manual_seed(5))
    ours = input_pipeline(DataConfig(**common, preset="caffe"), stats, "cpu", train=True)(
        rgb, torch.Generator().manual_seed(5)
    )
    assert torch.equal(ours, paper.flip(1))


def test_predict_reads_a_photo_squashed_as_caffe_did(tmp_path: Path, monkeypatch) -> None:
    """Issue 29: a caffe-preset checkpoint's predict resizes the whole photo to 256x256 (Caffe's
    convert_imageset), as the run's evaluation does, not to the paper's short side and centre square."""
    from builders.image_trees import photo
    from PIL import Image

    import alexnet2gpu.analysis.predict as predict

    checkpoint, _, _ = imported(tmp_path, caffe_weights())
    torch.save(checkpoint, tmp_path / "imported.pt")
    Image.fromarray(photo(3, 400, 240)).save(tmp_path / "wide.png")  # far from square: the two resizes differ
    seen = []
    real = predict.probabilities
    monkeypatch.setattr(
        predict, "probabilities", lambda trained, images, **kw: seen.append(images) or real(trained, images, **kw)
    )
    predict.predict(tmp_path / "imported.pt", [tmp_path / "wide.png"], devices="cpu")
    squashed, cropped = (stage_image(tmp_path / "wide.png", 256, squash)[None] for squash in (True, False))
    assert torch.equal(seen[0], squashed) and not torch.equal(squashed, cropped)
