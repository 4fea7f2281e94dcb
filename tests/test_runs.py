"""A run directory belongs to one run; a signal stops the loop at a step boundary and never tears a
checkpoint; only finite weights are saved; a resumed run uses what the user named, or refuses it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CPU, FAKE, SMALL

import alexnet2gpu.train.loop as loop
from alexnet2gpu.config import ConfigError, DataConfig, TrainConfig
from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.sampling import sample_note, take
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.errors import TrainingError
from alexnet2gpu.train.evaluate import evaluate
from alexnet2gpu.train.logs import read_csv
from alexnet2gpu.train.optim import PaperSGD
from alexnet2gpu.train.rundir import RunDir, RunDirError

# a narrow two-tower net and the paper's pipeline at unit pixel scale: a step takes a fraction of a second


def run(out: Path, max_steps: int, resume: Path | None = None, **options) -> dict:
    config = TrainConfig(epochs=10, batch_size=8, max_steps=max_steps, val_subset=8, seed=3, log_every=1)
    return loop.train(SMALL, FAKE, config, CPU, out, resume=resume, progress=False, tensorboard=False, **options)


def same_weights(a: Path, b: Path) -> bool:
    x, y = ckpt.load(a), ckpt.load(b)
    velocity = x["optimizer"]["state"], y["optimizer"]["state"]
    return all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]) and all(
        torch.equal(velocity[0][k]["velocity"], velocity[1][k]["velocity"]) for k in velocity[0]
    )


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alexnet2gpu", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. a run directory belongs to one run


def test_a_fresh_run_refuses_a_directory_holding_a_run(tmp_path: Path) -> None:
    run(tmp_path, max_steps=3)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(RunDirError, match=r"holds a run.*--resume .*last.pt.*--overwrite"):
        run(tmp_path, max_steps=1)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [row["step"] for row in read_csv(tmp_path / "train.csv")] == [1, 2, 3]
    run(tmp_path, max_steps=1, overwrite=True)  # starting over, explicitly: the old run's files are gone
    assert ckpt.load(tmp_path / "last.pt")["step"] == 1
    assert [row["step"] for row in read_csv(tmp_path / "train.csv")] == [1]


def test_two_processes_never_train_into_one_directory(tmp_path: Path) -> None:
    flags = ["--dataset", "fake", "--preset", "seed", "--net", "one-gpu", "--init", "he", "--devices", "cpu"]
    flags += ["-b", "4", "--subset", "4", "--val-subset", "4", "--max-steps", "1", "--no-tensorboard"]
    (tmp_path / "run").mkdir()  # a directory the claim did not create stays, even with nothing in it
    with RunDir(tmp_path / "run"):  # another process's run holds the directory
        line = one_line(cli("train", *flags, "--out", str(tmp_path / "run"), cwd=tmp_path), "in use by process")
        assert str(os.getpid()) in line
    # the lock file stays behind, as after a crash or SIGKILL: it no longer holds anything
    assert (tmp_path / "run" / ".lock").exists()
    assert cli("train", *flags, "--out", str(tmp_path / "run"), cwd=tmp_path).returncode == 0


def test_out_naming_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    result = cli("train", "--dataset", "fake", "--devices", "cpu", "--out", str(tmp_path / "notes.txt"), cwd=tmp_path)
    one_line(result, "is a file", "directory")


def test_a_run_folder_it_cannot_save_in_is_refused_before_the_first_step(tmp_path: Path, immutable) -> None:
    """The folder is test-written as a save writes (a temporary file renamed into place) before the
    first step: a resume into a folder that became unwritable stops at once in one line, instead of
    training until its first save (its .lock and .run already there, the claim alone passed)."""
    run(tmp_path, max_steps=1)
    saved = (tmp_path / "last.pt").read_bytes()
    immutable(tmp_path)
    with pytest.raises(RunDirError, match=r"cannot save in run directory .*Operation not permitted.*--out"):
        run(tmp_path, max_steps=3, resume=tmp_path / "last.pt")
    # no step was trained: an immutable folder's existing files can still be appended to, so a step would show
    assert [row["step"] for row in read_csv(tmp_path / "train.csv")] == [1]
    assert (tmp_path / "last.pt").read_bytes() == saved


def test_a_stale_temporary_checkpoint_is_removed(tmp_path: Path) -> None:
    from alexnet2gpu.files import temporary_name

    temporary_name(tmp_path / "last.pt").write_bytes(b"half a checkpoint")  # a save cut by SIGKILL
    run(tmp_path, max_steps=1)
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# 2. a signal asks the loop to stop: at a step boundary, with a whole checkpoint, resumable exactly


def signal_inside_the_step(monkeypatch, where: str, on_step: int) -> None:
    """SIGTERM sent to this process from inside step `on_step`, at `where`."""
    calls = {"n": 0}

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    if where.startswith("optimizer"):  # inside PaperSGD.step, between its foreach kernels
        # three _foreach_add_ per group (velocity += -decay lr w, velocity += -lr g, w += velocity), two
        # groups: after the first velocity term, after the first group's weights, after the last weights
        after = {"optimizer-first": 1, "optimizer-middle": 3, "optimizer-last": 6}[where]
        real = torch._foreach_add_

        def add_(tensors, *args, **kwargs):
            out = real(tensors, *args, **kwargs)
            if calls.get("stepping"):
                calls["params"] = calls.get("params", 0) + 1
                if calls["params"] == after:
                    kill()
            return out

        real_step = PaperSGD.step

        def step(self, closure=None):
            calls["n"] += 1
            calls["stepping"] = calls["n"] == on_step
            try:
                return real_step(self, closure)
            finally:
                calls["stepping"] = False

        monkeypatch.setattr(PaperSGD, "step", step)
        monkeypatch.setattr(torch, "_foreach_add_", add_)
        return
    real_call = loop.Pipeline.__call__

    def pipeline(self, images, generator=None, rows=None):
        calls["n"] += self.train
        if self.train and calls["n"] == on_step and where == "pipeline":
            kill()
        return real_call(self, images, generator, rows)

    monkeypatch.setattr(loop.Pipeline, "__call__", pipeline)
    if where == "backward":
        real_ce = loop.F.cross_entropy

        def cross_entropy(*args, **kwargs):
            loss = real_ce(*args, **kwargs)
            if calls["n"] == on_step and loss.requires_grad:
                loss.register_hook(lambda grad: kill())
            return loss

        monkeypatch.setattr(loop.F, "cross_entropy", cross_entropy)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run(out, max_steps=4)
    return out / "last.pt"


@pytest.mark.parametrize("where", ["pipeline", "backward", "optimizer-first", "optimizer-middle", "optimizer-last"])
def test_sigterm_anywhere_in_a_step_resumes_bit_identical(tmp_path: Path, monkeypatch, straight, where) -> None:
    signal_inside_the_step(monkeypatch, where, on_step=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, max_steps=4)
    monkeypatch.undo()
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["step"], saved["epoch"], saved["batch"]) == (3, 1, 1)  # the step under way was finished
    run(tmp_path, max_steps=4, resume=tmp_path / "last.pt")
    assert same_weights(tmp_path / "last.pt", straight)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_a_second_signal_during_the_save_does_not_cut_it(tmp_path: Path, monkeypatch, straight) -> None:
    signal_inside_the_step(monkeypatch, "pipeline", on_step=2)
    real_save = ckpt.torch.save

    def save_under_fire(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the user presses Ctrl-C again while the checkpoint is written
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_under_fire)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, max_steps=4)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp"))
    assert ckpt.load(tmp_path / "last.pt")["step"] == 2
    run(tmp_path, max_steps=4, resume=tmp_path / "last.pt")
    assert same_weights(tmp_path / "last.pt", straight)


# ---------------------------------------------------------------------------------------------
# 3. only finite weights are saved, and only a written checkpoint is named


def test_non_finite_weights_are_never_saved(tmp_path: Path, monkeypatch) -> None:
    run(tmp_path, max_steps=2)  # one epoch: last.pt at step 2
    before = (tmp_path / "last.pt").read_bytes()
    real_step = PaperSGD.step

    def poisoned(self, closure=None):  # the update of the run's last step leaves NaN weights
        out = real_step(self, closure)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(PaperSGD, "step", poisoned)
    with pytest.raises(TrainingError, match=r"not finite at step 3; not saved; the last checkpoint is .*\(step 2\)"):
        run(tmp_path, max_steps=3, resume=tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before


def test_a_run_that_never_saved_names_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    real = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(TrainingError, match="loss is inf at step 1 on rank 0; .*no checkpoint was written"):
        run(tmp_path, max_steps=2)
    assert not (tmp_path / "last.pt").exists()


# ---------------------------------------------------------------------------------------------
# 4. on resume, a flag takes effect and is recorded, or is refused


def test_resume_keeps_the_runs_options_and_applies_only_the_flags_given(tmp_path: Path) -> None:
    flags = ["--dataset", "fake", "--preset", "seed", "--init", "he", "--net", "one-gpu", "--devices", "cpu"]
    flags += ["-b", "4", "--subset", "8", "--val-subset", "4", "--lr", "0.02", "--no-tensorboard"]
    out = str(tmp_path / "run")
    assert cli("train", *flags, "--max-steps", "1", "--out", out, cwd=tmp_path).returncode == 0
    last = str(tmp_path / "run" / "last.pt")
    # no flags but --resume: the run's own network, data and recipe, not the command line's defaults
    result = cli("train", "--resume", last, "--out", out, "--max-steps", "2", "--devices", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = ckpt.load(last)["config"]
    assert (saved["train"]["lr"], saved["train"]["batch_size"], saved["train"]["max_steps"]) == (0.02, 4, 2)
    assert (saved["model"]["init"], saved["data"]["dataset"]) == ("he", "fake")
    # a flag that cannot change mid-run is refused, naming it; the run is untouched
    before = Path(last).read_bytes()
    for flag, value, field in (("--lr", "0.01", "lr=0.02"), ("-b", "8", "batch_size=4"), ("--seed", "5", "seed=0")):
        line = one_line(cli("train", "--resume", last, "--out", out, flag, value, cwd=tmp_path), field, "resume")
        assert "cannot change" in line
    assert Path(last).read_bytes() == before


def test_a_training_set_without_one_batch_is_refused(tmp_path: Path, monkeypatch) -> None:
    from alexnet2gpu.data.base import DatasetError
    from alexnet2gpu.data.datasets import InMemory

    empty = InMemory(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0), 10, "empty")
    monkeypatch.setattr(loop, "datasets_for", lambda *args, **kwargs: empty)
    with pytest.raises(DatasetError, match="empty: 0 training images make no batch of 8; add images or lower -b"):
        run(tmp_path, max_steps=1)


# ---------------------------------------------------------------------------------------------
# found by trying it as a hostile user would


def test_logged_numbers_of_a_resumed_epoch_are_the_uninterrupted_runs(tmp_path: Path, monkeypatch) -> None:
    straight, split, stopped = tmp_path / "straight", tmp_path / "split", tmp_path / "stopped"
    run(straight, max_steps=4)
    run(split, max_steps=3)  # stops inside epoch 2: the epoch's running sums go into the checkpoint
    run(split, max_steps=4, resume=split / "last.pt")
    signal_inside_the_step(monkeypatch, "pipeline", on_step=2)  # the last step of epoch 1: no validation yet
    with pytest.raises(KeyboardInterrupt):
        run(stopped, max_steps=4)
    monkeypatch.undo()
    run(stopped, max_steps=4, resume=stopped / "last.pt")
    for name in ("train.csv", "val.csv"):
        want = [{k: v for k, v in row.items() if k != "img_per_s"} for row in read_csv(straight / name)]
        for other in (split, stopped):
            assert [{k: v for k, v in row.items() if k != "img_per_s"} for row in read_csv(other / name)] == want


def test_a_resume_without_out_goes_on_in_the_checkpoints_directory(tmp_path: Path) -> None:
    flags = ["--dataset", "fake", "--preset", "seed", "--init", "he", "--net", "one-gpu", "--devices", "cpu"]
    flags += ["-b", "4", "--subset", "8", "--val-subset", "4", "--no-tensorboard"]
    assert cli("train", *flags, "--max-steps", "1", "--out", "somewhere/run", cwd=tmp_path).returncode == 0
    result = cli("train", "--resume", "somewhere/run/last.pt", "--max-steps", "2", "--devices", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ckpt.load(tmp_path / "somewhere" / "run" / "last.pt")["step"] == 2
    assert not (tmp_path / "runs").exists()  # not the default --out
    # the data set is part of the run: refused before any data is read (mnist would try a download)
    line = one_line(cli("train", "--resume", "somewhere/run/last.pt", "--dataset", "mnist", cwd=tmp_path), "dataset=")
    assert "cannot change on resume" in line


def test_a_resume_refused_for_several_changes_names_every_one(tmp_path: Path) -> None:
    """The network's fields and the recipe's, in one line: a user fixes them all at once, not one a try."""
    import dataclasses

    run(tmp_path, max_steps=1)
    checkpoint = ckpt.load(tmp_path / "last.pt")
    model, data, train = ckpt.read_configs(checkpoint, tmp_path / "last.pt")
    asked = {
        "model": dataclasses.replace(model, lrn=False),
        "data": dataclasses.replace(data, crop_chunk=7, workers=3),  # workers may change
        "train": dataclasses.replace(train, seed=4, schedule="plateau", max_steps=9),  # and max_steps
    }
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.check_resume(checkpoint, asked, tmp_path / "last.pt")
    line = str(refused.value)
    for field in ("lrn=True (this run: False)", "crop_chunk=", "seed=3 (this run: 4)", "schedule="):
        assert field in line, line
    assert "workers" not in line and "max_steps" not in line and "\n" not in line


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved-run")
    run(out, max_steps=1)
    return out / "last.pt"


@pytest.mark.parametrize(
    ("damage", "said"),
    [  # from a hostile pass: each ended in a traceback on resume, or trained on from a wrong state
        (lambda c: c["rng"].update(cpu=c["rng"]["cpu"][:3]), "its rng entry is not the generators' saved state"),
        (lambda c: c.update(optimizer={}), "its optimiser entry is not an optimiser's state"),
        (lambda c: next(iter(c["optimizer"]["state"].values())).update(velocity="x"), "other than tensors"),
        (lambda c: c["optimizer"]["param_groups"][0].update(lr="x"), "learning rate, momentum or decay"),
        (lambda c: c.update(scheduler=None), "its scheduler entry is not a schedule's state"),
        (lambda c: c.update(scheduler={"last_epoch": "x"}), "its scheduler's last_epoch is 'x'"),
        (lambda c: c.update(alarm={"recent": "x", "long": None, "fired": 3}), "its alarm entry is not"),
        (lambda c: c.update(epoch_totals=[1.0, math.nan, 2.0]), "its epoch totals are not three sums"),
        (lambda c: c["config"]["train"].update(alarm_window=10**30), "TrainConfig.alarm_window=10000"),
        (lambda c: c["config"]["train"].update(alarm_diverge_factor=math.nan), "alarm_diverge_factor=nan"),
        (lambda c: c.update(epoch=10**30), "its epoch is 1000000000000000000000000000000, past the 10 epochs"),
        (lambda c: c.update(batch=100), "is at batch 100 of an epoch, which has 2 batches"),
        (lambda c: c["config"]["model"].update(num_classes=10**12), "its config gives fc8 1000000000000 outputs"),
        (lambda c: c["config"]["data"].update(crop_size=100), "its crops are 100 pixels, its network's input 224"),
        (lambda c: c.update(stats=None), "it holds no data statistics (mean image, PCA), which its paper preset"),
        (lambda c: c["stats"]["eigval"].__setitem__(0, 1e30), "are not variances of pixels in [0, 1]"),
        (lambda c: c["stats"].update(eigvec=torch.ones(3, 3)), "its PCA's eigenvectors are not orthonormal"),
        (lambda c: c["stats"].update(mean=c["stats"]["mean"] * 1e6), "outside 0..255"),
        (lambda c: c.update(step=10**30), "more than its 0 epochs of 2 batches and 1 more account for"),
    ],
)
def test_a_resume_from_an_edited_checkpoint_is_one_line(saved_run: Path, tmp_path: Path, damage, said: str) -> None:
    checkpoint = torch.load(saved_run, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises((ckpt.CheckpointError, DatasetError, ConfigError)) as refused:
        run(tmp_path / "out", max_steps=3, resume=tmp_path / "last.pt")
    assert said in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_a_resume_with_nothing_left_says_so_in_place_too(tmp_path: Path, capsys) -> None:
    """In its own folder too (it said so only for another --out), and for a --max-steps already passed."""
    run(tmp_path, max_steps=2)
    capsys.readouterr()
    for max_steps in (2, 1):
        config = TrainConfig(epochs=10, batch_size=8, max_steps=max_steps, val_subset=8, seed=3, log_every=1)
        loop.train(SMALL, FAKE, config, CPU, tmp_path, resume=tmp_path / "last.pt", progress=True, tensorboard=False)
        said = capsys.readouterr().out
        assert f"nothing to train: {tmp_path / 'last.pt'} is at step 2, --max-steps {max_steps}" in said
        assert "not written" not in said
    assert ckpt.load(tmp_path / "last.pt")["step"] == 2


def test_a_last_pt_that_links_to_itself_is_named_as_such(tmp_path: Path) -> None:
    """A loop of links at last.pt is named as what it is, not as a missing checkpoint."""
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot open checkpoint .*loop.pt: Too many levels of symbolic"):
        ckpt.load(tmp_path / "loop.pt")


def test_a_last_pt_that_is_not_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run" / "last.pt").mkdir(parents=True)
    flags = ["--dataset", "fake", "--preset", "seed", "--net", "one-gpu", "--devices", "cpu", "--overwrite"]
    one_line(
        cli("train", *flags, "--out", str(tmp_path / "run"), cwd=tmp_path),
        "is a folder, where the run writes its last.pt",
    )


def test_sigterm_to_the_process_group_with_loader_workers_saves(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for label, cls in enumerate(("a", "b")):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(8):
                pixels = torch.full((48, 64, 3), 40 + 150 * label + i, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "img" / split / cls / f"{i}.jpg")
    flags = ["--dataset", "imagenet", "--data", str(tmp_path / "img"), "--preset", "seed", "--net", "one-gpu"]
    flags += ["--init", "he", "-b", "4", "-j", "2", "-p", "1", "--max-steps", "400", "--devices", "cpu"]
    command = [sys.executable, "-m", "alexnet2gpu", "train", *flags, "--no-tensorboard", "--out", "run"]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, text=True)
    csv = tmp_path / "run" / "train.csv"
    for _ in range(600):  # until the run has logged a step (at most a minute)
        if csv.exists() and len(csv.read_text().splitlines()) > 1:
            break
        process.poll() is None or pytest.fail("the run ended before it was signalled")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)  # what systemd, Slurm and Kubernetes send: the workers get it too
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    assert "stopped at step" in out
    assert ckpt.load(tmp_path / "run" / "last.pt")["step"] >= 1
    assert not list((tmp_path / "run").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# nothing lost: resume, signals and the disk


def big_logs(run_dir: Path) -> dict[str, bytes]:
    """The three logs of a long run (steps 1..20000), as `RunLog` writes them; returns their bytes."""
    from alexnet2gpu.train.logs import RunLog

    log = RunLog(run_dir, tensorboard=False)
    for step in range(1, 20_001):
        log.train(step=step, epoch=step // 100, lr=0.01, loss=2.302585, top1_err=0.9, img_per_s=1234.5)
        if step % 10 == 0:
            log.val(epoch=step // 10, step=step, lr=0.01, train_loss=2.3, loss=2.3, top1_err=0.9, top5_err=0.5)
            log.note(step, f"warning: step {step}: a note long enough to make events.log as big as the others")
    return {name: (run_dir / name).read_bytes() for name in ("train.csv", "val.csv", "events.log")}


@pytest.mark.parametrize("name", ["train.csv", "val.csv", "events.log"])
def test_a_crash_while_a_resume_rewrites_a_log_leaves_it_whole(tmp_path: Path, name: str) -> None:
    """The rewrite is cut where the disk refuses more bytes (RLIMIT_FSIZE: SIGXFSZ ends the process,
    as kill -9 would): the log on disk is still the whole old one."""
    import resource

    before = big_logs(tmp_path)
    for other in set(before) - {name}:
        (tmp_path / other).unlink()
    limit = len(before[name]) // 3

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = (
        "from alexnet2gpu.train.logs import RunLog; "
        f"RunLog({str(tmp_path)!r}, tensorboard=False).truncate_after(19_000)"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=small_disk, env=env, capture_output=True, timeout=120
    )
    assert result.returncode != 0, "the rewrite was not cut: raise the log's size"
    assert (tmp_path / name).read_bytes() == before[name]
    # the next resume rewrites it (and the next run start removes the temporary file, as a checkpoint's)
    from alexnet2gpu.train.logs import RunLog

    RunLog(tmp_path, tensorboard=False).truncate_after(19_000)
    assert (tmp_path / name).read_bytes().startswith(before[name][: limit // 2])
    assert len((tmp_path / name).read_bytes()) < len(before[name])


def test_a_last_log_line_cut_by_a_crash_is_dropped_on_resume_saying_so(tmp_path: Path, capsys) -> None:
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run(straight, max_steps=3)
    run(cut, max_steps=2)
    torn = {"train.csv": "3,1,0.01,2.2", "val.csv": "2,", "events.log": "3\twarning: step 3: training lo"}
    for name, line in torn.items():
        with (cut / name).open("a") as f:
            f.write(line)  # a write cut mid-line: no newline, cells missing
    capsys.readouterr()
    from alexnet2gpu.train.logs import read_csv

    assert [row["step"] for row in read_csv(cut / "val.csv")] == [2]  # `plot` reads it too
    run(cut, max_steps=3, resume=cut / "last.pt")
    err = capsys.readouterr().err
    for name in torn:
        assert err.count(f"{cut / name}: its last line was cut off") == 1 + (name == "val.csv"), err
    assert not (cut / "events.log").exists() or torn["events.log"] not in (cut / "events.log").read_text()
    for name in ("train.csv", "val.csv"):
        want = [{k: v for k, v in row.items() if k != "img_per_s"} for row in read_csv(straight / name)]
        assert [{k: v for k, v in row.items() if k != "img_per_s"} for row in read_csv(cut / name)] == want


def test_resume_keeps_no_tensorboard_and_devices_unless_given(tmp_path: Path, monkeypatch, capsys) -> None:
    import alexnet2gpu.cli as cli_module

    asked = []
    real = cli_module.resolve_devices
    monkeypatch.setattr(cli_module, "resolve_devices", lambda spec=None: asked.append(spec) or real(spec))
    flags = ["--dataset", "fake", "--preset", "seed", "--init", "he", "--net", "one-gpu", "-b", "4", "--subset", "8"]
    flags += ["--val-subset", "4", "--out", str(tmp_path / "run")]
    last = str(tmp_path / "run" / "last.pt")
    cli_module.main(["train", *flags, "--max-steps", "1", "--devices", "cpu,cpu", "--no-tensorboard"])
    cli_module.main(["train", "--resume", last, "--max-steps", "2"])  # no flags: the run's own
    assert asked == ["cpu,cpu", "cpu,cpu"]
    assert not (tmp_path / "run" / "tb").exists()
    saved = ckpt.load(last)["config"]["train"]
    assert (saved["devices"], saved["tensorboard"]) == ("cpu,cpu", False)
    cli_module.main(["train", "--resume", last, "--max-steps", "3", "--tensorboard", "--devices", "cpu"])
    assert asked[-1] == "cpu" and (tmp_path / "run" / "tb").is_dir()
    saved = ckpt.load(last)["config"]["train"]
    assert (saved["devices"], saved["tensorboard"]) == ("cpu", True)


# ---------------------------------------------------------------------------------------------
# samples over all classes, the disk checked first, validation that diverges,
# a dataset of another class count


def test_subsets_of_imagenet_are_a_fixed_sample_over_all_classes(tmp_path: Path) -> None:
    """Stored class by class, the first N images of ImageNet would be one class: a short run's 0% error."""
    from builders.image_trees import photo_tree

    from alexnet2gpu.data.datasets import build_dataset

    root = photo_tree(tmp_path / "tree", classes=("ant", "bee", "cow", "dog"), per_class=5)
    train = build_dataset("imagenet", "train", str(root))
    val = build_dataset("imagenet", "val", str(root))
    sample = take(train, 6)
    again = take(build_dataset("imagenet", "train", str(root)), 6)
    assert sample.indices == again.indices == sorted(sample.indices)  # fixed, in file order
    assert len({int(train.labels[i]) for i in sample.indices}) >= 3  # not the first class alone
    even = take(val, 4, stratified=True)
    assert sorted(int(val.labels[i]) for i in even.indices) == [0, 1, 2, 3]  # one image of each class
    counts = torch.bincount(val.labels[take(val, 6, stratified=True).indices], minlength=4)
    assert sorted(counts.tolist()) == [1, 1, 2, 2]  # as even over the classes as 6 allows
    note = sample_note("--val-subset", 4, val, even)
    assert note == "--val-subset: a fixed sample (seed 0) of 4 of 8 images, 4 of 4 classes"
    assert sample_note("--val-subset", 100, val, take(val, 100)) == (
        "--val-subset 100: all 8 images (the set holds no more)"
    )


def test_a_disk_too_small_for_the_checkpoint_stops_the_run_before_its_first_step(tmp_path: Path, monkeypatch) -> None:
    usage = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    monkeypatch.setattr(loop, "train_step", lambda *a: pytest.fail("trained on a disk that cannot hold its checkpoint"))
    with pytest.raises(ckpt.CheckpointError, match=r"needs about [\d.]+ MiB .*and its disk has 0.1 MiB free"):
        run(tmp_path / "run", max_steps=2)


def test_validation_that_finds_nan_names_what_is_kept(tmp_path: Path, monkeypatch) -> None:
    run(tmp_path, max_steps=2)  # one epoch: last.pt at step 2
    real_step, calls = PaperSGD.step, []

    def poisoned(self, closure=None):  # the epoch's last update (step 4) leaves NaN weights; its loss was finite
        out = real_step(self, closure)
        calls.append(1)
        if len(calls) == 2:
            for group in self.param_groups:
                group["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(PaperSGD, "step", poisoned)
    with pytest.raises(
        TrainingError,
        match=r"validation after epoch 2: the model's outputs are NaN or inf for 8 of 8 images.*; the weights are "
        r"not finite at step 4; not saved; the last checkpoint is .*last.pt \(step 2\)",
    ):
        run(tmp_path, max_steps=4, resume=tmp_path / "last.pt")
    assert ckpt.load(tmp_path / "last.pt")["step"] == 2


def test_validation_without_a_number_keeps_finite_weights(tmp_path: Path, monkeypatch) -> None:
    real = loop.F.log_softmax
    monkeypatch.setattr(loop.F, "log_softmax", lambda x, dim: real(x, dim) * float("nan"))
    with pytest.raises(TrainingError, match=r"validation after epoch 1: .*; saved .*last.pt \(step 2\) unvalidated"):
        run(tmp_path, max_steps=4)
    monkeypatch.setattr(loop.F, "log_softmax", real)
    assert run(tmp_path, max_steps=4, resume=tmp_path / "last.pt")["step"] == 4  # validates epoch 1, goes on


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        (("ant", "bee", "cow", "dog", "eel"), ("has 5 classes", "run/last.pt was trained on 3")),
        (("ant", "bee"), ("has 2 classes", "run/last.pt was trained on 3")),
        (("ant", "bat", "cow"), ("other classes", "1 of 3 differ", "label 1: 'bat' here, 'bee' in training")),
    ],
    ids=["more", "fewer", "renamed"],
)
def test_a_dataset_of_other_classes_is_refused_by_evaluate_and_resume(tmp_path: Path, classes, words) -> None:
    from builders.image_trees import photo_tree

    photo_tree(tmp_path / "trained", classes=("ant", "bee", "cow"), per_class=4)
    photo_tree(tmp_path / "other", classes=classes, per_class=4)
    flags = ["--dataset", "imagenet", "--preset", "seed", "--net", "one-gpu", "--init", "he", "-b", "4"]
    flags += ["--max-steps", "1", "--val-subset", "2", "-j", "0", "--devices", "cpu", "--no-tensorboard"]
    trained = cli("train", *flags, "--data", str(tmp_path / "trained"), "--out", "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert ckpt.categories(ckpt.load(tmp_path / "run" / "last.pt")).ids == ("ant", "bee", "cow")
    for command in (
        ["evaluate", "--checkpoint", "run/last.pt", "--data", str(tmp_path / "other"), "--devices", "cpu", "-j", "0"],
        ["train", "--resume", "run/last.pt", "--data", str(tmp_path / "other"), "--max-steps", "2"],
    ):
        one_line(cli(*command, cwd=tmp_path), *words, "--data")


def test_class_names_travel_with_the_data_and_the_checkpoint(tmp_path: Path) -> None:
    from builders.image_trees import photo_tree

    from alexnet2gpu.data.datasets import build_dataset

    assert build_dataset("fashion-mnist", "val").categories.names[:2] == ("T-shirt/top", "Trouser")
    assert build_dataset("fake", "val").categories.ids[0] == "template 0"
    root = photo_tree(tmp_path / "tree", classes=("n01440764", "n01443537"), per_class=2)
    (root / "synset_words.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    categories = build_dataset("imagenet", "val", str(root)).categories
    assert categories.ids == ("n01440764", "n01443537") and categories.short(1) == "goldfish"
    assert categories.names[0] == "tench, Tinca tinca"
    result = run(tmp_path / "run", max_steps=1)
    assert ckpt.categories(ckpt.load(result["checkpoint"])).ids[:2] == ("template 0", "template 1")


def test_a_resume_hides_the_tensorboard_events_after_its_checkpoint(tmp_path: Path) -> None:
    """Events a crashed run wrote past its checkpoint are purged, as its CSV rows are dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    config = TrainConfig(epochs=10, batch_size=8, max_steps=2, val_subset=8, seed=3, log_every=1)
    loop.train(SMALL, FAKE, config, CPU, tmp_path, progress=False, tensorboard=True)  # last.pt at step 2
    with SummaryWriter(str(tmp_path / "tb")) as crashed:  # steps 3 and 4 of a run killed before its save
        for step in (3, 4):
            crashed.add_scalar("train/loss", 99.0, step)
    config = TrainConfig(epochs=10, batch_size=8, max_steps=4, val_subset=8, seed=3, log_every=1)
    loop.train(SMALL, FAKE, config, CPU, tmp_path, resume=tmp_path / "last.pt", progress=False, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4] and 99.0 not in [e.value for e in losses]


def test_the_disk_check_counts_the_new_checkpoint_beside_the_old(tmp_path: Path, monkeypatch) -> None:
    usage = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=3_000))
    path = tmp_path / "last.pt"
    assert ckpt.check_room(path, 2_000) == 3_000  # one save alone fits
    with pytest.raises(ckpt.CheckpointError, match="room for two"):
        ckpt.check_room(path, 2_000, replaces=True)  # a run writes the second beside the first
    path.write_bytes(b"x" * 2_000)
    assert ckpt.check_room(path, 2_000, replaces=True) == 3_000  # the old one is already on the disk


def test_a_run_directory_inside_an_imagenet_split_is_refused(tmp_path: Path) -> None:
    from builders.image_trees import photo_tree

    root = photo_tree(tmp_path / "inet", classes=("ant", "bee"), per_class=2)
    flags = ["--dataset", "imagenet", "--data", str(root), "--preset", "seed", "--net", "one-gpu", "-b", "2"]
    for out in (root / "train" / "ant", root / "val"):
        one_line(cli("train", *flags, "--out", str(out), "--devices", "cpu", cwd=tmp_path), "is inside", "outside")
    assert sorted(p.name for p in (root / "train" / "ant").iterdir()) == ["ant_0.jpg", "ant_1.jpg"]


def test_validation_loss_is_the_cross_entropy_however_small_the_probability(tmp_path: Path) -> None:
    """A clamped log(p) capped every such image's loss at -ln(1e-12) = 27.63."""
    from alexnet2gpu.data.datasets import fake_dataset
    from alexnet2gpu.data.transforms import input_pipeline

    class Sure(torch.nn.Module):  # certain of class 0, by 1000 logits
        def __init__(self, classes: int = 10) -> None:
            super().__init__()
            self.classes = classes
            self.where = torch.nn.Parameter(torch.zeros(1))  # evaluate puts labels on the model's device

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), self.classes).float() * 1000

    val = fake_dataset("val")
    pipeline = input_pipeline(DataConfig(dataset="fake", preset="seed"), None, "cpu", train=False)
    result = evaluate(Sure(), take(val, 20), pipeline, progress=False)
    assert result["loss"] == pytest.approx(1000 * 18 / 20, rel=1e-4)  # 18 of 20 images are not of class 0
    four = take(fake_dataset("val", num_classes=4), 8)
    assert evaluate(Sure(4), four, pipeline, progress=False)["top5_err"] is None  # 4 classes: no top-5


def test_a_resume_with_nothing_left_to_train_names_the_checkpoint_it_has(tmp_path: Path, capsys) -> None:
    """A finished run resumed into a new --out trains no step: it reports the resumed checkpoint, not a
    last.pt in --out that was never written, and says how to go on."""
    config = TrainConfig(epochs=1, batch_size=8, val_subset=8)
    loop.train(SMALL, FAKE, config, CPU, tmp_path / "a", progress=False, tensorboard=False)
    resumed = loop.train(
        SMALL, FAKE, config, CPU, tmp_path / "b", resume=tmp_path / "a" / "last.pt", progress=True, tensorboard=False
    )
    assert resumed["checkpoint"] == str(tmp_path / "a" / "last.pt") and not (tmp_path / "b" / "last.pt").exists()
    assert "nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("when", ["at the start", "mid-run"])
def test_a_tensorboard_that_cannot_write_is_one_warning_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys, when):
    """Issue 29: TensorBoard is a side job; its failure (a tb/ that cannot be made, an event file that
    becomes unwritable) costs the events, not the run."""
    import torch.utils.tensorboard as tb

    real = tb.SummaryWriter

    class Failing(real):
        def __init__(self, *args, **kwargs) -> None:
            if when == "at the start":
                raise PermissionError(13, "Permission denied")
            super().__init__(*args, **kwargs)

        def add_scalar(self, *args, **kwargs) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb, "SummaryWriter", Failing)
    config = TrainConfig(epochs=2, batch_size=8, val_subset=8, log_every=1)
    result = loop.train(SMALL, FAKE, config, CPU, tmp_path, progress=False, tensorboard=True)
    assert result["epoch"] == 2 and (tmp_path / "last.pt").is_file()
    assert len(read_csv(tmp_path / "val.csv")) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard events" in line]
    assert len(warnings) == 1 and ("Permission denied" if when == "at the start" else "No space") in warnings[0]


def test_a_data_worker_killed_saves_the_run_and_names_the_likely_cause(tmp_path: Path, monkeypatch) -> None:
    """Issue 29: the OOM killer takes a decoding worker mid-epoch: the steps so far are saved, and the
    one line names the worker, the likely cause and the checkpoint to resume from."""
    import dataclasses

    from alexnet2gpu.data.base import DatasetError

    class KilledAt:
        """The training set, but its worker is killed at its `at`-th image, as the OOM killer would."""

        def __init__(self, dataset, at: int) -> None:
            self.dataset, self.at, self.calls = dataset, at, 0

        def __len__(self) -> int:
            return len(self.dataset)

        def __getitem__(self, i):
            if torch.utils.data.get_worker_info() is not None:  # a worker's own copy counts from its start
                self.calls += 1
                if self.calls == self.at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return self.dataset[i]

        def __getattr__(self, name):
            return getattr(self.dataset, name)

    real = loop.datasets_for
    monkeypatch.setattr(
        loop,
        "datasets_for",
        lambda data, split: KilledAt(real(data, split), 13) if split == "train" else real(data, split),
    )
    data = dataclasses.replace(FAKE, workers=1)
    config = TrainConfig(epochs=1, batch_size=4, val_subset=8, log_every=1, seed=5)
    with pytest.raises(
        DatasetError,
        match=r"data worker \d+ (was killed|ended unexpectedly).*out-of-memory killer.*saved .*last.pt at step",
    ):
        loop.train(SMALL, data, config, CPU, tmp_path, progress=False, tensorboard=False)
    saved = ckpt.load(tmp_path / "last.pt")
    assert 0 < saved["step"] < 4 and saved["batch"] == saved["step"]
    # the dead worker is no longer DataLoader's: its SIGCHLD check would raise at the next child's exit
    # (a suite once ended in an INTERNALERROR that way, inside pytest, a test later)
    torch.utils.data._utils.signal_handling._error_if_any_worker_fails()


@pytest.mark.parametrize(
    "raised, said",
    [
        ("DataLoader worker (pid 4242) is killed by signal: Killed.", "data worker 4242 was killed (Killed)"),
        ("DataLoader worker (pid(s) 4242) exited unexpectedly", "data worker 4242 ended unexpectedly"),
    ],
)
def test_both_of_dataloaders_words_for_adead_worker_become_the_one_line(raised: str, said: str) -> None:
    """Which of the two DataLoader raises depends on whether its SIGCHLD handler or a failed queue read
    sees the death first (CI saw the second): both are the same death and get the same line."""
    from alexnet2gpu.data.datasets import worker_killed

    line = str(worker_killed(RuntimeError(raised)))
    assert line.startswith(said) and "out-of-memory killer" in line and "resume" in line
    assert worker_killed(RuntimeError("DataLoader timed out after 600 seconds")) is None


def test_a_worker_dying_while_it_hands_over_a_batch_is_the_same_line() -> None:
    """The third report of the same death (the suite saw it): the connection that passes a batch's shared
    memory is reset mid-read, a ConnectionResetError, before either of DataLoader's own checks runs."""
    from types import SimpleNamespace

    from alexnet2gpu.data.datasets import dead_worker

    alive = SimpleNamespace(pid=1, exitcode=None, is_alive=lambda: True)
    killed = SimpleNamespace(pid=4242, exitcode=-9, is_alive=lambda: False)
    line = str(dead_worker(SimpleNamespace(_workers=[alive, killed])))
    assert line.startswith("data worker 4242 was killed (Killed)") and "out-of-memory killer" in line
    assert dead_worker(SimpleNamespace(_workers=[alive]), wait_s=0.1) is None  # then the error goes on as it is
