"""Staging: the staged images are the live path's, nothing is lost without a line in the
manifest, an interrupted stage resumes, a damaged staged folder is one line, training reads it."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from builders.image_trees import awkward_images, leftovers, photo_tree, unreadable_images

from alexnet2gpu.cli import main
from alexnet2gpu.config import AlexNetConfig, DataConfig, StageConfig, TrainConfig
from alexnet2gpu.data import staging
from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.datasets import batches, build_dataset, describe
from alexnet2gpu.train.logs import read_csv

SMALL_SHARDS = StageConfig(shard_images=4)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Three classes of photo-like images plus every awkward case and tool leftovers."""
    root = photo_tree(tmp_path_factory.mktemp("raw"))
    awkward = awkward_images(root / "train" / "bee")
    unreadable = unreadable_images(root / "train" / "cow")
    leftovers(root)
    return root, awkward, unreadable


@pytest.fixture(scope="module")
def staged(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("staged") / "imagenet"
    staging.stage(raw[0], out, SMALL_SHARDS, workers=2, progress=False)
    return out


def everything(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batches(dataset, 64, shuffle=False), strict=True)
    return torch.cat(images), torch.cat(labels)


def test_staged_images_are_the_live_paths_within_jpeg_error(raw, staged) -> None:
    root, awkward, unreadable = raw
    for split in ("train", "val"):
        live, fast = build_dataset("imagenet", split, str(root)), build_dataset("imagenet", split, str(staged))
        assert isinstance(fast, staging.StagedImages) and fast.classes == live.classes == ["ant", "bee", "cow"]
        (x, y), (sx, sy) = everything(live), everything(fast)
        assert torch.equal(y, sy) and sx.shape == x.shape and sx.dtype == torch.uint8
        sources = json.loads((staged / split / "files.json").read_text())  # row i was staged from sources[i]
        assert [Path(s).name for s in sources] == [p.name for p, _ in live.samples if p.name not in unreadable]
        photos = [i for i, source in enumerate(sources) if Path(source).name not in awkward]
        error = (x.float() - sx.float()).abs().mean((1, 2, 3))  # per image, grey levels
        assert error[photos].mean() < 2 and error[photos].max() < 2.5, error
        assert error.mean() < 2  # the awkward images too (a 1-bit pattern is JPEG's hardest case)


def test_manifest_counts_every_source_and_lists_the_skipped(raw, staged) -> None:
    root, _, unreadable = raw
    manifest = json.loads((staged / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert (
        train["images"] + len(train["skipped"])
        == train["sources"]
        == len(build_dataset("imagenet", "train", str(root)))
    )
    assert sorted(Path(item["path"]).name for item in train["skipped"]) == sorted(unreadable)
    assert all(item["path"].startswith("train/cow/") and item["reason"] for item in train["skipped"])
    assert manifest["quality"] == 95 and manifest["subsampling"] == "4:4:4" and manifest["stage_size"] == 256
    assert manifest["source"] == str(root.resolve()) and manifest["package_version"]
    assert manifest["classes"] == ["ant", "bee", "cow"] and manifest["splits"]["val"]["skipped"] == []
    assert not list(staged.rglob("*.tmp")) and not list(staged.rglob("*.done.json"))
    assert describe("imagenet", str(staged)) == (3, 3)


def test_an_interrupted_stage_resumes_keeping_its_complete_shards(raw, tmp_path: Path, monkeypatch) -> None:
    root = raw[0]
    real, calls = staging.encode, []

    def fail_in_the_second_shard(*args):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("injected failure")
        return real(*args)

    out = tmp_path / "staged"
    monkeypatch.setattr(staging, "encode", fail_in_the_second_shard)
    with pytest.raises(RuntimeError, match="injected"):
        staging.stage(root, out, SMALL_SHARDS, progress=False)
    monkeypatch.setattr(staging, "encode", real)
    first, partial = out / "train" / "00000.jpegs", out / "train" / "00001.jpegs"
    assert (
        first.is_file() and not partial.exists() and not list(partial.parent.glob("*.tmp"))
    )  # its temporary file went too
    assert not staging.is_staged(out)  # nothing half-written looks complete
    with pytest.raises(DatasetError, match="did not finish"):
        build_dataset("imagenet", "train", str(out))
    with pytest.raises(DatasetError, match="another quality"):
        staging.stage(root, out, StageConfig(shard_images=4, quality=80), progress=False)

    kept = first.stat().st_ino, first.stat().st_mtime_ns
    staging.stage(root, out, SMALL_SHARDS, progress=False)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept  # not written again
    straight = tmp_path / "straight"
    staging.stage(root, straight, SMALL_SHARDS, progress=False)
    for path in sorted(straight.rglob("*")):
        if path.is_file() and path.name != "manifest.json":  # the manifest holds the date
            assert path.read_bytes() == (out / path.relative_to(straight)).read_bytes(), path


def test_train_two_steps_and_fit_stats_on_a_staged_folder(staged, tmp_path: Path, capsys) -> None:
    from alexnet2gpu.train.loop import train

    main(["fit-stats", "--dataset", "imagenet", "--data", str(staged), "--fit-images", "8", "-j", "0"])
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["images"] == 8 and fitted["stage_size"] == 256 and len(fitted["eigval"]) == 3

    data = DataConfig(dataset="imagenet", data=str(staged), preset="paper", fit_images=8, workers=0)
    config = TrainConfig(epochs=1, batch_size=4, max_steps=2, val_subset=4, seed=1, log_every=1)
    cpu = (torch.device("cpu"),) * 2
    result = train(
        AlexNetConfig(num_classes=3, init="he"), data, config, cpu, tmp_path, progress=False, tensorboard=False
    )
    assert result["step"] == 2 and (tmp_path / "last.pt").is_file()
    rows = read_csv(tmp_path / "train.csv")
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)


def test_stage_size_must_match_and_gpu_decode_needs_cuda(staged) -> None:
    with pytest.raises(DatasetError, match="holds 256x256 images, the run asks for stage_size=300"):
        build_dataset("imagenet", "train", str(staged), stage_size=300)
    if not torch.cuda.is_available():
        with pytest.raises(DatasetError, match="needs a CUDA device"):
            build_dataset("imagenet", "train", str(staged), gpu_decode=True)


def copy_of(staged: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    for path in staged.rglob("*"):
        target = copy / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            target.write_bytes(path.read_bytes())
    return copy


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda c: (c / "train" / "index.npy").write_bytes((c / "train" / "index.npy").read_bytes()[:100]),
            "corrupt index",
        ),
        (lambda c: (c / "train" / "00001.jpegs").write_bytes(b"short"), "00001.jpegs: 5 bytes, the index says"),
        (lambda c: (c / "train" / "00002.jpegs").unlink(), "00002.jpegs: missing"),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    ],
)
def test_a_damaged_staged_folder_is_one_line(staged, tmp_path: Path, damage, message: str, capsys) -> None:
    copy = copy_of(staged, tmp_path)
    damage(copy)
    with pytest.raises(DatasetError, match=message) as caught:
        build_dataset("imagenet", "train", str(copy))
    assert "\n" not in str(caught.value) and "stage again" in str(caught.value)
    with pytest.raises(SystemExit) as exit_:
        main(["fit-stats", "--dataset", "imagenet", "--data", str(copy), "-j", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message.split(":")[0] in err


def test_damaged_bytes_in_a_shard_are_skipped_by_their_checksum(staged, tmp_path: Path, caplog) -> None:
    copy = copy_of(staged, tmp_path)
    dataset = build_dataset("imagenet", "train", str(copy))
    row = dataset.index[5]
    shard = dataset.shards[int(row["shard"])]
    data = bytearray(shard.read_bytes())
    data[int(row["offset"]) + 400] ^= 0xFF
    shard.write_bytes(data)
    with caplog.at_level("WARNING"):
        assert dataset[5] is None and dataset[4] is not None
    assert "CRC-32" in caplog.text and "row 5" in caplog.text
    strict = build_dataset("imagenet", "train", str(copy), strict=True)
    with pytest.raises(DatasetError) as caught:
        list(batches(strict, 4, shuffle=False, workers=1))  # raised in a worker: still one line
    assert "\n" not in str(caught.value) and "CRC-32" in str(caught.value)


def test_batches_decoded_as_a_list_skip_what_does_not_decode(staged, tmp_path: Path) -> None:
    """The GPU path (encoded bytes from the workers, one decode per batch) run on the CPU: a batch
    that fails as a whole is decoded image by image, and the unreadable image is dropped."""
    copy = copy_of(staged, tmp_path)
    dataset = build_dataset("imagenet", "train", str(copy))
    reference, labels = everything(dataset)
    row = dataset.index[1]
    shard = dataset.shards[int(row["shard"])]
    data = bytearray(shard.read_bytes())
    start = int(row["offset"])
    data[start : start + 4] = b"\x00\x00\x00\x00"  # no JPEG header: decode fails, the checksum is redone
    shard.write_bytes(data)
    dataset.index["crc32"][1] = zlib.crc32(data[start : start + int(row["length"])])
    dataset.decode_device = torch.device("cpu")
    images, got = everything(dataset)
    keep = [i for i in range(len(labels)) if i != 1]
    assert torch.equal(got, labels[keep]) and torch.equal(images, reference[keep])


def test_stage_command_and_its_refusals(raw, tmp_path: Path, capsys) -> None:
    root, _, unreadable = raw
    out = tmp_path / "staged"
    main(["stage", "--data", str(root), "--out", str(out), "-j", "0", "--quality", "90"])
    printed = capsys.readouterr().out
    bad = len(unreadable)  # every one of them skipped, the 24 others staged
    assert f"train: 24 images of {24 + bad} staged, {bad} skipped" in printed and "val: 6 images of 6 staged" in printed
    assert json.loads((out / "manifest.json").read_text())["quality"] == 90
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for argv, message in [
        (["--data", str(root), "--out", str(busy)], "not empty and holds no stage"),
        (["--data", str(out), "--out", str(tmp_path / "again")], "is a staged folder already"),
        (["--data", str(root), "--out", str(out)], "another quality"),
        (["--data", str(root), "--out", str(busy / "notes.txt")], "is a file"),
        (["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "nowhere does not exist: it names"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["stage", *argv, "-j", "0"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["stage", "--data", str(root), "--out", str(tmp_path / "strict"), "-j", "0", "--strict"])
    assert exit_.value.code == 2 and "unreadable image" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_gives_the_cpu_decodes_pixels(staged) -> None:
    cpu, labels = everything(build_dataset("imagenet", "train", str(staged)))
    gpu, gpu_labels = everything(build_dataset("imagenet", "train", str(staged), gpu_decode=True))
    assert gpu.is_cuda and torch.equal(gpu_labels.cpu(), labels)
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 1  # nvJPEG and libjpeg-turbo may round apart
