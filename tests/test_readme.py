"""The README cannot drift from the code: every command it shows is checked here, cheaply.

A make line is expanded with `make -n` (nothing runs) and the `python -m alexnet2gpu` commands it
expands to are parsed by the CLI's own parser, with the flags and folders the README gives; a
`python -m alexnet2gpu` line is parsed the same way. Seconds in all.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet2gpu.cli import HelpFormatter, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV = Path(sys.executable).parent.parent  # the venv running the tests: make's PY then exists
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def shown_commands() -> list[str]:
    """The commands of the README's sh blocks (continuations joined, comments dropped, `a && b` split)
    and its inline `make ...` / `python ...` spans."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        lines += [shlex.join(shlex.split(line, comments=True)) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:make|python) [^`]+)`", README)
    return [part.strip() for line in lines for part in line.split("&&") if part.strip()]


COMMANDS = shown_commands()


def make_dry(*argv: str, cuda: int = 2) -> str:
    """make's expansion of a make line, joined into one line per command."""
    out = subprocess.run(
        ["make", "-n", f"VENV={VENV}", f"CUDA_COUNT={cuda}", *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, f"make -n {' '.join(argv)}: {out.stderr}"
    return out.stdout.replace("\\\n", " ")


def cli_calls(expansion: str) -> list[list[str]]:
    """The argv of each `python -m alexnet2gpu ...` (or torchrun's) in make's expansion."""
    calls = []
    for segment in re.split(r";|\n|&&", expansion):
        if "-m alexnet2gpu" in segment:
            calls.append(shlex.split(segment.split("-m alexnet2gpu", 1)[1]))
    return calls


def test_the_readme_shows_commands_of_every_path():
    assert len(COMMANDS) > 10
    for target in ("setup", "demo", "train-1gpu", "train-2gpu", "stage", "evaluate", "train-dist"):
        assert any(c.startswith(f"make {target}") for c in COMMANDS), target


@needs_make
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_a_make_line_expands_to_the_flags_it_claims(command: str):
    argv = shlex.split(command)[1:]
    expansion = make_dry(*argv)
    given = dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))
    calls = cli_calls(expansion)
    if argv[0] in ("setup", "clean", "test", "lint", "gpu-check"):  # no alexnet2gpu command: expanding is the check
        return
    assert calls, f"{command}: no alexnet2gpu command in {expansion}"
    for call in calls:
        build_parser().parse_args(call)  # every flag exists and every value is one the CLI takes
    main = " ".join(shlex.join(c) for c in calls)
    for flag in shlex.split(given.get("ARGS", "")):
        assert flag in main, f"{command}: {flag} missing from {main}"
    if "DATA" in given:
        assert f"--data {given['DATA']}" in main
    if "OUT" in given:
        assert given["OUT"] in main
    if argv[0] == "train-dist":
        assert f"--nproc-per-node {given.get('NPROC', 2)}" in expansion
        assert f"--nnodes {given.get('NNODES', 1)}" in expansion


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m alexnet2gpu")])
def test_a_cli_line_parses(command: str):
    argv = shlex.split(command)[3:]
    if argv == ["..."]:  # the README's shorthand for any command
        return
    if "--help" in argv:  # --help exits: its command must exist
        assert argv[0] in build_parser()._subparsers._group_actions[0].choices
        return
    build_parser().parse_args(argv)


def test_every_command_is_one_the_tests_know():
    known = ("make ", "python -m alexnet2gpu ", "python experiments/figure2.py ", "apt-get install ")
    assert [c for c in COMMANDS if not c.startswith(known)] == []


def test_the_figure2_script_draws(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import figure2
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    figure2.draw(str(tmp_path / "figure2.png"))
    assert (tmp_path / "figure2.png").stat().st_size > 10_000


def test_the_readmes_links_and_pictures_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert (ROOT / "docs/figure2-towers.png").stat().st_size < 200_000


@needs_make
def test_make_defaults_follow_the_dataset_and_agree_with_the_cli():
    def flags(*argv: str) -> dict[str, str]:
        """The first train call's flags and their values, as the shell would pass them (make quotes them)."""
        call = cli_calls(make_dry(*argv))[0]
        return dict(zip(call[1::2], call[2::2], strict=True))

    one = flags("train-1gpu")
    assert (one["--dataset"], one["--epochs"], one["--out"]) == ("fashion-mnist", "1", "runs/fashion-mnist")
    imagenet = flags("train-2gpu", "DATASET=imagenet")
    assert (imagenet["--epochs"], imagenet["--out"], imagenet["--devices"]) == (
        "91",
        "runs/imagenet",
        "cuda:0,cuda:1",
    )  # K12's
    assert "runs/DATASET" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


@needs_make
@pytest.mark.parametrize(("gpus", "nproc"), [(0, 2), (1, 2), (2, 2), (3, 2), (8, 8)])
def test_train_dist_takes_the_visible_gpus_in_pairs(gpus: int, nproc: int):
    assert f"--nproc-per-node {nproc} " in make_dry("train-dist", cuda=gpus)


@needs_make
def test_train_dist_refuses_an_odd_nproc():
    out = subprocess.run(
        ["make", f"VENV={VENV}", "-o", f"{VENV}/.installed", "-o", "setup", "train-dist", "NPROC=3", "CUDA_COUNT=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "NPROC=3: tower processes come in pairs" in out.stdout


def test_help_shows_every_default():
    subparsers = build_parser()._subparsers._group_actions[0].choices
    for name, parser in subparsers.items():
        formatter = HelpFormatter(prog=name)
        for action in parser._actions:
            if not action.option_strings or action.default is None or action.default is False:
                continue
            if action.dest == "help":
                continue
            assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings}"


@needs_make
def test_train_dist_runs_four_ranks_two_pairs_through_make(tmp_path: Path):
    """The cluster path for real, on one CPU machine: NPROC=4 tower processes (2 pairs) on gloo."""
    args = "--max-steps 2 -b 8 --preset seed --init he --subset 32 --val-subset 8 -j 0 -p 1 --no-tensorboard"
    out = subprocess.run(
        ["make", f"VENV={VENV}", "-o", f"{VENV}/.installed", "-o", "setup", "train-dist", "NPROC=4", "CUDA_COUNT=0"]
        + ["DATASET=fake", "EPOCHS=1", f"OUT={tmp_path / 'run'}", f"ARGS={args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # rank 0 logged both steps of the 4-rank run
    assert (tmp_path / "run" / "last.pt").is_file()


def test_every_parser_default_is_its_config_field_and_help_shows_it():
    import dataclasses
    import subprocess
    import sys

    from alexnet2gpu import cli
    from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    # None: the dataset's batch; the preset's (or the net's own) init and the other fields a preset sets
    computed = {"batch_size", "help", *cli.PRESET_FLAGS}
    fields = {}
    for config in (DataConfig(), AlexNetConfig(), TrainConfig()):
        fields.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    checked = 0
    for action in train._actions:
        if action.dest in computed or action.dest not in fields:
            continue
        default = cli.FLIPS[action.default] if action.dest == "flip" else action.default
        assert default == fields[action.dest], action.dest
        checked += 1
    assert checked >= 25
    out = subprocess.run([sys.executable, "-m", "alexnet2gpu", "train", "--help"], capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    for section in ("data (DataConfig):", "model (AlexNetConfig):", "training (TrainConfig):"):
        assert section in text
    assert "default: 91 (K12 run 145's)" in text and "(default: 0.01)" in text and "default: imagenet" in text
    assert "(default: k12)" in text  # K12 is the source a user sees first
