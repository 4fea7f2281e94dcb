"""Nothing of the user's destroyed, nothing hung: special files, links, foreign logs, two writers, bombs.

Each case ends in one line and a refusal (or a skip with its reason), and leaves the user's files as
they were. Reads that could wait forever run under an alarm, so a regression fails instead of hanging."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shlex
import signal
import stat
import struct
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from builders.caffe_files import caffe_weights, write_model
from builders.image_trees import photo_tree
from builders.imagenet_archives import official

from alexnet2gpu import files
from alexnet2gpu.cli import main
from alexnet2gpu.data import archives
from alexnet2gpu.data.archives import DEVKIT, TRAIN_TAR, VAL_TAR
from alexnet2gpu.data.base import DatasetError, imagenet_words
from alexnet2gpu.data.datasets import ImageFolderStaged, class_names, read_idx
from alexnet2gpu.data.images import UnreadableImage, stage_image
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.logs import RunLog
from alexnet2gpu.train.rundir import MARK, RunDir, RunDirError

ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def within(seconds: int):
    """Fail (not hang) when the block takes longer than `seconds`: a read that waits on a FIFO."""

    def late(*_):
        raise TimeoutError(f"still waiting after {seconds} s: a read blocked")

    old = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(capsys, argv: list[str]) -> str:
    """The CLI exits 2 with one error line (no traceback); that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. import-caffe --out


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "net.caffemodel", caffe_weights())


def test_import_caffe_refuses_a_fifo_or_a_device_as_out(tmp_path: Path, model: Path, capsys) -> None:
    fifo = tmp_path / "out.pt"
    os.mkfifo(fifo)
    with within(20):
        line = refused(capsys, ["import-caffe", str(model), "--out", str(fifo), "--overwrite"])
    assert "a FIFO" in line and stat.S_ISFIFO(os.lstat(fifo).st_mode), line
    if ROOT:  # a character device like /dev/null, made where the test may
        device = tmp_path / "null"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        line = refused(capsys, ["import-caffe", str(model), "--out", str(device), "--overwrite"])
        assert "character device" in line and stat.S_ISCHR(os.lstat(device).st_mode), line
    assert not (tmp_path / files.LOCK).exists()  # the refusal took no lock and left none


def test_import_caffe_keeps_an_existing_file_and_a_trained_run(tmp_path: Path, model: Path, capsys) -> None:
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"my own file")
    assert "exists" in refused(capsys, ["import-caffe", str(model), "--out", str(mine)])
    assert mine.read_bytes() == b"my own file"
    main(["import-caffe", str(model), "--out", str(mine), "--overwrite"])
    assert ckpt.load(mine)["step"] == 0
    assert not (tmp_path / files.LOCK).exists()

    run = tmp_path / "run"
    main(["import-caffe", str(model), "--out", str(run / "last.pt")])
    (run / "train.csv").write_text("step,epoch,lr,loss,top1_err,img_per_s\n1,0,0.01,2.3,0.9,10\n")
    before = (run / "last.pt").read_bytes()
    assert "holds a run" in refused(capsys, ["import-caffe", str(model), "--out", str(run / "last.pt")])
    assert (run / "last.pt").read_bytes() == before
    with RunDir(run, resume=run / "last.pt"):  # a run training there holds the folder
        assert "in use by" in refused(
            capsys, ["import-caffe", str(model), "--out", str(run / "last.pt"), "--overwrite"]
        )
    main(["import-caffe", str(model), "--out", str(run / "last.pt"), "--overwrite"])
    assert not (run / "train.csv").exists()  # the old run's logs went with its network


# ---------------------------------------------------------------------------------------------
# 2. train deletes only what a run of ours wrote


def test_a_fresh_run_refuses_logs_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "tb" / "other_run").mkdir(parents=True)
    (out / "tb" / "other_run" / "events").write_text("someone's events")
    (out / "train.csv").write_text("my own table\n")
    with pytest.raises(RunDirError, match=r"holds train.csv, tb/, not written by a run of alexnet2gpu"):
        RunDir(out).__enter__()
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(RunDirError, match="not written by a run"):
        RunDir(link).__enter__()
    other = tmp_path / "other"
    with pytest.raises(RunDirError, match="not written by a run"):
        RunDir(out, resume=other / "last.pt").__enter__()  # --resume elsewhere --out mine
    assert (out / "train.csv").read_text() == "my own table\n"
    assert (out / "tb" / "other_run" / "events").read_text() == "someone's events"
    assert not (out / files.LOCK).exists() or (out / files.LOCK).read_text() == ""
    with RunDir(out, overwrite=True):  # asked for: deleted
        assert not (out / "train.csv").exists() and not (out / "tb").exists()


def test_an_attempt_that_never_saved_is_replaced_and_a_shared_tb_link_survives(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunDir(out):
        (out / "train.csv").write_text("step\n1\n")  # the attempt logged, then crashed before saving
    assert (out / MARK).is_file()
    shared = tmp_path / "shared_tb"
    (shared / "another_run").mkdir(parents=True)
    (out / "tb").symlink_to(shared)
    with RunDir(out):
        assert not (out / "train.csv").exists() and not os.path.lexists(out / "tb")
    assert (shared / "another_run").is_dir()  # the link went, never what it points to


def test_a_renamed_checkpoint_resumes_in_its_own_folder_keeping_its_logs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.csv").write_text("step\n1\n")
    (out / "old.pt").write_bytes(b"x")
    with RunDir(out, resume=out / "old.pt"):
        assert (out / "train.csv").read_text() == "step\n1\n"


def test_a_log_name_that_is_a_link_or_a_fifo_is_refused_before_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text("not the run's\n")
    (out / "train.csv").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="train.csv is a symbolic link"):
        RunDir(out, overwrite=True).__enter__()
    (out / "train.csv").unlink()
    os.mkfifo(out / "val.csv")
    with within(20), pytest.raises(RunDirError, match="val.csv is a FIFO"):
        RunDir(out, overwrite=True).__enter__()
    assert elsewhere.read_text() == "not the run's\n"


# ---------------------------------------------------------------------------------------------
# 3. special files are never read; 5. writes never follow a link


def test_fifos_and_devices_named_like_images_are_skipped_with_their_reason(tmp_path: Path) -> None:
    root = photo_tree(tmp_path / "imagenet", classes=("ant", "bee"), per_class=2)
    os.mkfifo(root / "train" / "ant" / "pipe.JPEG")
    with within(30):
        with pytest.raises(UnreadableImage, match="is a FIFO, not a regular file"):
            stage_image(root / "train" / "ant" / "pipe.JPEG")
        dataset = ImageFolderStaged(root / "train", class_names(root / "train"))
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(item is None for item in items) == 1 and dataset.skipped.value == 1
    if ROOT:
        os.mknod(tmp_path / "zero.png", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero
        with within(20), pytest.raises(UnreadableImage, match="character device"):
            stage_image(tmp_path / "zero.png")


def test_a_class_list_that_links_to_a_device_is_ignored(tmp_path: Path, caplog) -> None:
    (tmp_path / "synset_words.txt").symlink_to("/dev/zero")
    with within(20):
        assert imagenet_words(tmp_path, ["n01440764"]) == ["n01440764"]
    assert "character device" in caplog.text


def test_a_predict_of_a_fifo_reports_it_and_goes_on(tmp_path: Path, capsys) -> None:
    model = write_model(tmp_path / "net.caffemodel", caffe_weights())
    main(["import-caffe", str(model), "--out", str(tmp_path / "run" / "last.pt")])
    photos = photo_tree(tmp_path / "imagenet", classes=("ant",), per_class=1)
    os.mkfifo(tmp_path / "pipe.png")
    capsys.readouterr()
    with within(60), contextlib.suppress(SystemExit):  # the exit status says an image was unreadable
        main(["predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), str(tmp_path / "pipe.png"), str(photos)])
    captured = capsys.readouterr()
    assert "pipe.png" in captured.err and "FIFO" in captured.err, captured.err
    assert "ant_0" in captured.out, captured.out  # the readable image was still predicted


def test_a_checkpoint_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "last.pt")
    with within(20), pytest.raises(ckpt.CheckpointError, match="is a FIFO, not a checkpoint file"):
        ckpt.load(tmp_path / "last.pt")


def test_appends_never_follow_a_link_and_replaced_outputs_leave_the_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "outside.csv"
    target.write_text("mine\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.csv").symlink_to(target)
    log = RunLog(run, tensorboard=False)
    with pytest.raises(files.NotRegularFile, match="symbolic link"):
        log.train(step=1, epoch=0, lr=0.01, loss=2.0, top1_err=0.9, img_per_s=1.0)
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"my picture")
    (run / "curves.png").symlink_to(picture)
    with files.atomic_write(run / "curves.png") as tmp:
        tmp.write_bytes(b"new figure")
    assert picture.read_bytes() == b"my picture" and target.read_text() == "mine\n"
    assert (run / "curves.png").read_bytes() == b"new figure" and not (run / "curves.png").is_symlink()


# ---------------------------------------------------------------------------------------------
# 4. two writers of one checkpoint


def test_two_writers_of_one_checkpoint_never_tear_it(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    ckpt.save({"w": torch.zeros(1000)}, path)
    errors: list[BaseException] = []
    done = threading.Event()

    def write(value: float) -> None:
        try:
            for _ in range(15):
                ckpt.save({"w": torch.full((1000,), value)}, path)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    def read() -> None:
        while not done.is_set():
            w = torch.load(path, weights_only=True)["w"]
            if not (w == w[0]).all():
                errors.append(AssertionError("a mixed checkpoint"))

    writers = [threading.Thread(target=write, args=(v,)) for v in (1.0, 2.0)]
    reader = threading.Thread(target=read)
    for thread in (*writers, reader):
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert not errors, errors[0]
    assert not list(tmp_path.glob(f"*{files.TEMPORARY}"))


# ---------------------------------------------------------------------------------------------
# 7. bombs are refused from what the format says, early


def test_an_idx_gzip_that_inflates_past_its_header_is_refused(tmp_path: Path) -> None:
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 4, 4)  # 32 bytes of images declared
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(header + bytes(64 << 20)))  # 64 MB inside, 64 KB on disk
    with pytest.raises(DatasetError, match=r"header says \(2, 4, 4\) = 32 bytes, file holds more"):
        read_idx(bomb)
    huge = tmp_path / "huge-idx3-ubyte"
    huge.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 100_000, 1000, 1000))
    with pytest.raises(DatasetError, match="more than the"):
        read_idx(huge)


def test_a_checkpoint_with_compressed_entries_is_refused_before_reading(tmp_path: Path) -> None:
    good = ckpt.save({"w": torch.zeros(10)}, tmp_path / "good.pt")
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ckpt.CheckpointError, match="compressed entries"):
        ckpt.load(packed)


# ---------------------------------------------------------------------------------------------
# 9. a refusal leaves nothing behind


def test_a_refused_stage_leaves_no_lock(tmp_path: Path, capsys) -> None:
    root = photo_tree(tmp_path / "imagenet", classes=("ant",), per_class=1)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    line = refused(capsys, ["stage", "--data", str(root), "--out", str(out)])
    assert "not empty" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# 8. make passes its variables as values, never as commands


def make_n(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=False)


def test_make_quotes_every_variable_and_checks_the_numbers() -> None:
    for target in ("plot", "evaluate", "train-1gpu"):
        plan = make_n(target, "OUT=x; echo INJECTED", "DATA=a b")
        command = [line for line in plan.stdout.splitlines() if "alexnet2gpu" in line][-1]
        words = list(shlex.shlex(command, posix=True, punctuation_chars=";"))  # an unquoted ; is a word of its own
        assert "echo" not in words and any(w.startswith("x; echo INJECTED") for w in words), words
        if target != "plot":
            assert "a b" in words, command
    for variable in ("NPROC=abc", "NPROC=2 4", "NNODES=1;2", "EPOCHS=1x"):
        plan = make_n("train-dist", variable)
        assert plan.returncode != 0 and "is not a whole number" in plan.stderr, plan.stderr


# ---------------------------------------------------------------------------------------------
# 6. the archives are checked, not trusted


def retar(src: Path, dst: Path, change) -> None:
    """`src`'s members written to `dst` through `change(name, data)`, which returns [(name, data), ...]."""
    mode = "w:gz" if src.name.endswith(".gz") else "w"
    with tarfile.open(src) as old, tarfile.open(dst, mode) as new:
        for member in old:
            for name, data in change(member.name, old.extractfile(member).read()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                new.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return official(tmp_path_factory.mktemp("downloads") / "official")


def damaged(downloads: Path, folder: Path, which: str, change) -> Path:
    folder.mkdir()
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT):
        (folder / name).symlink_to(downloads / name)
    (folder / which).unlink()
    retar(downloads / which, folder / which, change)
    return folder


def inner_tar(images: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("which", "change", "message"),
    [
        (TRAIN_TAR, lambda n, d: [(n, d)] + ([("more/" + n, d)] if n == "n01440764.tar" else []), "n01440764 twice"),
        (TRAIN_TAR, lambda n, d: [(n, d)] + ([("../n09999999.tar", d)] if n == "n01440764.tar" else []), "climbs"),
        (TRAIN_TAR, lambda n, d: [(n, inner_tar({"../../x.JPEG": b"x"}) if n == "n01440764.tar" else d)], "climbs"),
        (VAL_TAR, lambda n, d: [(n, d)] + ([("/abs/x.JPEG", d)] if n.endswith("01.JPEG") else []), "absolute"),
        (
            VAL_TAR,
            lambda n, d: [(n, d)] * (not n.endswith("03.JPEG")),
            "holds 5 images, the devkit's ground truth names 6",
        ),
        (VAL_TAR, lambda n, d: [(n, d), ("again/" + n, d)] if n.endswith("02.JPEG") else [(n, d)], "twice"),
        (DEVKIT, lambda n, d: [(n, d + b"1\n" * 1000 if n.endswith("ground_truth.txt") else d)], "names 1006"),
        (  # a class number meta.mat lacks (it said "its class (None) is not among the train archive's classes")
            DEVKIT,
            lambda n, d: [(n, b"0" + d[1:] if n.endswith("ground_truth.txt") else d)],
            "gives it class 0, which its meta.mat does not list",
        ),
    ],
)
def test_damaged_archives_are_refused_in_one_line(downloads, tmp_path: Path, capsys, which, change, message) -> None:
    folder = damaged(downloads, tmp_path / "damaged", which, change)
    line = refused(capsys, ["stage", "--data", str(folder), "--out", str(tmp_path / "staged"), "-j", "0"])
    assert message in line, line
    assert not (tmp_path / "staged").exists()


def test_a_meta_mat_that_inflates_past_its_bound_is_refused(downloads, tmp_path: Path, capsys, monkeypatch) -> None:
    def compressed(name: str, data: bytes):
        if name.endswith("meta.mat"):
            synsets = scipy.io.loadmat(io.BytesIO(data))["synsets"]
            buffer = io.BytesIO()
            scipy.io.savemat(buffer, {"synsets": synsets, "padding": np.zeros(4096)}, do_compression=True)
            data = buffer.getvalue()
        return [(name, data)]

    folder = damaged(downloads, tmp_path / "bomb", DEVKIT, compressed)
    monkeypatch.setattr(archives, "META_MAX_INFLATED", 16 << 10)  # the padding alone inflates to 32 KB
    line = refused(capsys, ["stage", "--data", str(folder), "--out", str(tmp_path / "staged"), "-j", "0"])
    assert "inflates to more than 16,384 bytes" in line, line
    monkeypatch.setattr(archives, "META_MAX_INFLATED", 1 << 20)  # the same file within the bound stages
    main(["stage", "--data", str(folder), "--out", str(tmp_path / "staged"), "-j", "0"])
    assert (tmp_path / "staged" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (b"\x89HDF\r\n\x1a\n" + bytes(120) + b"MATLAB 7.3 MAT-file", "MATLAB v7.3 (HDF5) file"),
        ("numbers", "unreadable devkit (IndexError"),
    ],
)
def test_a_meta_mat_of_another_kind_is_one_line(downloads, tmp_path: Path, capsys, meta, message: str) -> None:
    """Issue 29: meta.mat in MATLAB v7.3 (scipy: NotImplementedError) or a synsets of numbers (IndexError)."""

    def replaced(name: str, data: bytes):
        if name.endswith("meta.mat"):
            if meta == "numbers":
                buffer = io.BytesIO()
                scipy.io.savemat(buffer, {"synsets": np.arange(5.0)})
                return [(name, buffer.getvalue())]
            header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"
            return [(name, header + meta)]
        return [(name, data)]

    folder = damaged(downloads, tmp_path / "meta", DEVKIT, replaced)
    line = refused(capsys, ["stage", "--data", str(folder), "--out", str(tmp_path / "staged"), "-j", "0"])
    assert message in line, line


def test_a_manifest_declaring_millions_of_shards_is_refused_at_once(tmp_path: Path) -> None:
    from alexnet2gpu.data import staging
    from alexnet2gpu.data.staged import StagedImages

    out = tmp_path / "staged"
    staging.stage(photo_tree(tmp_path / "imagenet", classes=("ant", "bee"), per_class=2), out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["images"] = 30_000_000
    (out / "manifest.json").write_text(json.dumps(manifest))
    with within(20), pytest.raises(DatasetError, match="the manifest declares 30000000 images"):
        StagedImages(out, "train")


def test_only_the_packages_own_temporary_files_are_swept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / ".notes.tmp").write_text("the user's")
    cut = files.temporary_name(out / "last.pt")
    cut.write_bytes(b"half a checkpoint")  # what a SIGKILL during a save leaves
    with RunDir(out):
        pass
    assert (out / ".notes.tmp").read_text() == "the user's" and not cut.exists()
