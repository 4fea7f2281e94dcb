"""Staging ImageNet as it is downloaded: the official archives and Kaggle's copy stage to the
bytes the extracted ImageFolder tree stages to, val labels through the devkit; a staged folder is
written by one process at a time, a killed stage leaves no worker and resumes to the same bytes, a
flipped label is caught, and replaced data is fitted again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders.imagenet_archives import CLASSES, IDS, VAL_CLASSES, WORDS, image_folder, kaggle, official

from alexnet2gpu.cli import main
from alexnet2gpu.config import StageConfig
from alexnet2gpu.data import staging
from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.datasets import build_dataset

SMALL_SHARDS = StageConfig(shard_images=4)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("downloads")
    return {
        "tree": image_folder(root / "tree"),
        "official": official(root / "official"),
        "kaggle": kaggle(root / "kaggle"),
    }


@pytest.fixture(scope="module")
def reference(downloads, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "staged"
    staging.stage(downloads["tree"], out, SMALL_SHARDS, progress=False)
    return out


def same_stage(a: Path, b: Path) -> None:
    """The same shards and index, byte for byte, and the same classes and words."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".jpegs", ".npy"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.suffix in (".jpegs", ".npy")) and names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert ma["classes"] == mb["classes"] == CLASSES and ma["words"] == mb["words"] == [WORDS[c] for c in CLASSES]


def test_the_official_archives_stage_to_the_extracted_trees_bytes(downloads, reference, tmp_path: Path) -> None:
    out = tmp_path / "from-archives"
    manifest = staging.stage(downloads["official"], out, SMALL_SHARDS, workers=2, progress=False)
    same_stage(reference, out)
    assert manifest["source_kind"] == "official archives"
    val = build_dataset("imagenet", "val", str(out))
    files = json.loads((out / "val" / "files.json").read_text())
    for row, name in enumerate(files):  # each val image's label is its ground-truth class's sorted place
        k = int(name.split("_val_")[1][:8]) - 1
        assert int(val.labels[row]) == CLASSES.index(VAL_CLASSES[k])
    assert list(IDS) != [CLASSES.index(w) + 1 for w in IDS.values()]  # the devkit's IDs are not the labels
    assert files[0].startswith("ILSVRC2012_img_val.tar/")
    assert json.loads((out / "train" / "files.json").read_text())[0] == (
        f"ILSVRC2012_img_train.tar/{CLASSES[0]}.tar/{CLASSES[0]}_1.JPEG"
    )
    assert val.categories.names[0] == WORDS[CLASSES[0]]


def test_the_three_files_named_one_by_one_and_kaggles_layout(downloads, reference, tmp_path: Path, capsys) -> None:
    files = [str(downloads["official"] / name) for name in sorted(os.listdir(downloads["official"]))]
    main(["stage", "--data", *files, "--out", str(tmp_path / "files"), "-j", "0"])
    assert "val: 6 images of 6 staged" in capsys.readouterr().out
    staging.stage(downloads["tree"], tmp_path / "tree", progress=False)  # the command's shard size
    same_stage(tmp_path / "tree", tmp_path / "files")
    staging.stage(downloads["kaggle"], tmp_path / "kaggle", SMALL_SHARDS, progress=False)
    same_stage(reference, tmp_path / "kaggle")


def test_refusals_are_one_line(downloads, tmp_path: Path, capsys) -> None:
    official_dir = downloads["official"]
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "ILSVRC2012_img_train.tar").write_bytes((official_dir / "ILSVRC2012_img_train.tar").read_bytes())
    for argv, message in [
        (["--data", str(downloads["tree"]), "--out", str(downloads["tree"] / "staged")], "is inside --data"),
        (["--data", str(lonely), "--out", str(tmp_path / "a")], "lacks ILSVRC2012_img_val.tar, ILSVRC2012_devkit"),
        (["--data", str(official_dir / "ILSVRC2012_img_val.tar"), "--out", str(tmp_path / "b")], "lacks"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["stage", *argv, "-j", "0"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (downloads["tree"] / "staged").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("damage", ["fifo", "latin-1"])
def test_kaggles_val_solution_that_is_a_fifo_or_not_utf8_is_one_line(downloads, tmp_path: Path, capsys, damage) -> None:
    """A FIFO named LOC_val_solution.csv is refused, not waited on (its read would never end); bytes that
    are not UTF-8 name the file."""
    import shutil

    root = tmp_path / "kaggle"
    shutil.copytree(downloads["kaggle"], root, symlinks=True)
    solution = root / "LOC_val_solution.csv"
    if damage == "fifo":
        solution.unlink()
        os.mkfifo(solution)
    else:
        solution.write_bytes(solution.read_bytes().replace(b"ImageId", "Imag\u00e9Id".encode("latin-1"), 1))
    with pytest.raises(SystemExit) as exit_:
        main(["stage", "--data", str(root), "--out", str(tmp_path / "out"), "-j", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and str(solution) in err, err
    assert ("is a FIFO" if damage == "fifo" else "is not UTF-8 text") in err, err


SLOW_STAGE = """
import sys, time
from alexnet2gpu.data import staging
from alexnet2gpu.config import StageConfig
real = staging.encode
def slow(*args):
    time.sleep({delay})
    return real(*args)
staging.encode = slow
staging.stage(sys.argv[1], sys.argv[2], StageConfig(shard_images=4), workers={workers}, progress=False)
"""


def slow_stage(raw: Path, out: Path, *, delay: float, workers: int) -> subprocess.Popen:
    script = textwrap.dedent(SLOW_STAGE).format(delay=delay, workers=workers)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", script, str(raw), str(out)], env=env, start_new_session=True)


def wait_for(condition, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def group(pgid: int) -> list[int]:
    """The live processes of a process group (zombies are no workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if entry.name.isdigit() and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def test_a_second_stage_on_the_same_folder_is_refused(downloads, reference, tmp_path: Path, capsys) -> None:
    out = tmp_path / "staged"
    first = slow_stage(downloads["tree"], out, delay=0.1, workers=0)
    try:
        wait_for(lambda: (out / ".lock").is_file() and (out / ".lock").read_text().strip(), "the first stage's lock")
        with pytest.raises(SystemExit) as exit_:
            main(["stage", "--data", str(downloads["tree"]), "--out", str(out), "-j", "0"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and f"is being staged by process {first.pid}" in err
    finally:
        assert first.wait(120) == 0
    same_stage(reference, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_leaves_no_worker_and_a_rerun_gives_the_same_bytes(downloads, reference, tmp_path: Path) -> None:
    out = tmp_path / "staged"
    stage = slow_stage(downloads["tree"], out, delay=1.0, workers=2)  # a second per image
    try:
        wait_for(lambda: list((out / "train").glob("*.done.json")), "a complete shard")
        assert len(group(stage.pid)) == 3  # the stage and its two workers, each inside an image now
        os.kill(stage.pid, signal.SIGKILL)  # the stage alone: its workers must go by themselves, at once
        stage.wait(10)
        time.sleep(0.3)  # well under an image's second: a worker that outlived its parent is still here
        assert not group(stage.pid)
    finally:
        for pid in group(stage.pid):
            os.kill(pid, signal.SIGKILL)
    assert not staging.is_staged(out)
    staging.stage(downloads["tree"], out, SMALL_SHARDS, workers=2, progress=False)
    same_stage(reference, out)


def test_a_reused_shard_is_verified_not_trusted(downloads, reference, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "staged"
    real = staging._finish
    monkeypatch.setattr(staging, "_finish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        staging.stage(downloads["tree"], out, SMALL_SHARDS, progress=False)
    monkeypatch.setattr(staging, "_finish", real)
    shard = out / "train" / "00001.jpegs"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length: only the CRC-32s tell
    shard.write_bytes(data)
    staging.stage(downloads["tree"], out, SMALL_SHARDS, progress=False)
    same_stage(reference, out)


def test_a_flipped_label_names_the_index(reference, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    for path in reference.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(reference)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(reference)).write_bytes(path.read_bytes())
    index = copy / "train" / "index.npy"
    data = bytearray(index.read_bytes())
    rows = len(np.load(reference / "train" / "index.npy"))
    label = len(data) - rows * staging.INDEX_DTYPE.itemsize + staging.INDEX_DTYPE.fields["label"][1]
    data[label] ^= 1  # row 0: class 0 -> class 1, a label in range
    index.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        build_dataset("imagenet", "train", str(copy))
    message = str(caught.value)
    assert "\n" not in message and str(index) in message and "SHA-256" in message and "stage again" in message


def test_a_dataset_replaced_in_place_is_fitted_again(downloads, tmp_path: Path) -> None:
    from alexnet2gpu.data.stats import load_or_fit

    tree = image_folder(tmp_path / "tree")
    out = tmp_path / "staged"
    staging.stage(tree, out, SMALL_SHARDS, progress=False)

    def fit(data: Path) -> torch.Tensor:
        dataset = build_dataset("imagenet", "train", str(data))
        return load_or_fit(
            dataset, name="imagenet", data=str(data), stage_size=256, limit=None, cache_dir=tmp_path
        ).mean

    before = {data: fit(data) for data in (tree, out)}
    assert torch.equal(fit(tree), before[tree])  # cached
    victim = tree / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"
    victim.write_bytes((tree / "val" / VAL_CLASSES[0] / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert not torch.equal(fit(tree), before[tree])  # the folder's images changed: fitted again
    for path in sorted(out.rglob("*"), reverse=True):  # the staged folder replaced by a stage of the new images
        path.unlink() if path.is_file() else path.rmdir()
    staging.stage(tree, out, SMALL_SHARDS, progress=False)
    assert not torch.equal(fit(out), before[out])
