"""The table at the end of `make gpu-check`: one row per check, PASS, FAIL or SKIP, and a key number
or the last error line. Exits 1 when any check failed.

`tools/gpu_check.sh` leaves, for each check NAME, in its output folder:
  NAME.skip   the reason it was skipped (then nothing else)
  NAME.rc     "EXIT_CODE SECONDS LIMIT_SECONDS" once the command ended
  NAME.out    its stdout (a bench's or a training run's JSON)
  NAME.log    its stderr
and, for the 20-step runs, a run folder NAME/ with train.csv. Anything may be missing, empty or
garbled (a command that crashed, timed out or never ran): this script says so in that row and
goes on. It needs the standard library alone, so it runs where torch does not import.

    python tools/gpu_check_summary.py OUT [--rel-tol 2e-3] [--note TEXT]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
TIMEOUT_CODES = (124, 137)  # timeout(1)'s own code, and SIGKILL after its grace period
ERROR_LINE = re.compile(r"error|Error|ERROR|FAILED|Exception|Traceback|Killed|refused|No such file")
NOISE_LINE = re.compile(r"ChildFailedError|^\s*(=+|-+|\^+|~+)\s*$|^\s*$")
# the runs whose train.csv losses must agree, the first being the reference
AGREEMENT = ("train_1gpu_20", "train_2gpu_20", "train_torchrun_20")


class Unreadable(Exception):
    """A check ran but left nothing usable; the message goes into its row."""


# ---------------------------------------------------------------------------------------------
# reading what a check left


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def last_json(path: Path) -> dict:
    """The JSON object on the last non-empty line of `path` (a command may print lines before it)."""
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise Unreadable(f"no output in {path.name} (empty or missing)")
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise Unreadable(f"garbled JSON in {path.name} ({error.msg}): {shorten(lines[-1], 60)}") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path.name} holds {type(value).__name__}, not a JSON object")
    return value


def shorten(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def last_error_line(out: Path, name: str) -> str:
    """The most telling line of a failed command: its last error-looking line, stderr first."""
    for suffix in (".log", ".out"):
        lines = [line for line in read_text(out / f"{name}{suffix}").splitlines() if not NOISE_LINE.search(line)]
        errors = [line for line in lines if ERROR_LINE.search(line)]
        if errors:
            return shorten(errors[-1])
    for suffix in (".log", ".out"):
        lines = [line for line in read_text(out / f"{name}{suffix}").splitlines() if not NOISE_LINE.search(line)]
        if lines:
            return shorten(lines[-1])
    return "no output"


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from RUN_DIR/train.csv (alexnet2gpu.train.logs.TRAIN_FIELDS)."""
    path = run_dir / "train.csv"
    try:
        with path.open(newline="") as f:
            return {int(float(row["step"])): float(row["loss"]) for row in csv.DictReader(f)}
    except FileNotFoundError:
        raise Unreadable(f"no {path.parent.name}/train.csv") from None
    except (KeyError, TypeError, ValueError) as error:
        raise Unreadable(f"unreadable {path.parent.name}/train.csv ({error!r})") from None


# ---------------------------------------------------------------------------------------------
# the key number of each check that passed (an exception turns the row into a FAIL)


def machine_key(out: Path, name: str) -> str:
    m = last_json(out / f"{name}.out")
    if m.get("missing"):
        raise Unreadable(f"missing Python modules: {', '.join(m['missing'])}")
    gpus = m.get("gpus") or []
    torch_line = f"torch {m.get('torch')} (CUDA {m.get('cuda_build')})"
    if not gpus:
        raise Unreadable(m.get("why") or f"{torch_line} sees no CUDA device; nvidia-smi: {m.get('nvidia_smi')}")
    return f"{len(gpus)} x {gpus[0]}; {torch_line}; nvidia-smi: {m.get('nvidia_smi')}"


def pytest_key(out: Path, name: str) -> str:
    lines = [line.strip("= ") for line in read_text(out / f"{name}.out").splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    if not summary:
        raise Unreadable("no pytest summary line")
    if " passed" not in summary:
        raise Unreadable(f"nothing ran: {summary}")
    return summary


def bench_key(out: Path, name: str) -> str:
    r = last_json(out / f"{name}.out")
    try:
        rows = {(x["kind"], x["model"], x["batch"]): x for x in r["rows"]}
        towers = rows["train", "towers_one_device", 64]["img_per_s"]
        return (
            f"towers train b64 {towers:,.0f} img/s; towers/torchvision {r['train_ratio_vs_torchvision']:.3f}, "
            f"towers/fused {r['train_ratio_towers_vs_fused']:.3f}; matmul {r['matmul_gflop_per_s']:,.0f} GFLOP/s"
        )
    except (KeyError, TypeError, ValueError) as error:
        raise Unreadable(f"bench JSON lacks {error}") from None


def bench_data_key(out: Path, name: str) -> str:
    r = last_json(out / f"{name}.out")
    try:
        return (
            f"paper pipeline {r['img_per_s']['paper_batched']:,} img/s on {r['device']}, "
            f"{r['ratio_paper_vs_seed']}x the seed's per-sample one"
        )
    except (KeyError, TypeError) as error:
        raise Unreadable(f"bench JSON lacks {error}") from None


def bench_imagenet_key(out: Path, name: str) -> str:
    r = last_json(out / f"{name}.out")
    try:
        gpu = r["gpu_decode_img_per_s"]
        return (
            f"staged/live {r['ratio_staged_vs_raw']}x; all workers staged {r['staged_img_per_s_all_workers']:,} img/s; "
            f"GPU decode {'none' if gpu is None else f'{gpu:,} img/s'}"
        )
    except (KeyError, TypeError) as error:
        raise Unreadable(f"bench JSON lacks {error}") from None


def train_key(out: Path, name: str) -> str:
    r = last_json(out / f"{name}.out")
    val = r.get("val") or {}
    error = val.get("top1_err") if isinstance(val, dict) else None
    seconds = read_text(out / f"{name}.rc").split()[1:2]
    took = f" in {seconds[0]} s" if seconds else ""
    val_text = f", val top-1 error {error:.4f}" if isinstance(error, (int, float)) else ", no validation"
    return f"step {r.get('step')}, epoch {r.get('epoch')}{val_text}{took}"


def steps_key(out: Path, name: str) -> str:
    losses = read_losses(out / name)
    if not losses:
        raise Unreadable(f"{name}/train.csv has no rows")
    first, last = min(losses), max(losses)
    return f"{len(losses)} steps logged; loss {losses[first]:.4f} at step {first}, {losses[last]:.4f} at {last}"


KEYS: dict[str, Callable[[Path, str], str]] = {
    "machine": machine_key,
    "gpu_tests": pytest_key,
    "gpu_tests_2gpu": pytest_key,
    "bench_fp32": bench_key,
    "train_2epochs": train_key,
    "train_1gpu_20": steps_key,
    "train_2gpu_20": steps_key,
    "train_torchrun_20": steps_key,
    "agree_2gpu": None,  # computed from the three runs above, see agreement()
    "bench_bf16": bench_key,
    "bench_channels_last": bench_key,
    "bench_data": bench_data_key,
    "bench_imagenet": bench_imagenet_key,
    "bench_bf16_channels_last_compile": bench_key,
}


# ---------------------------------------------------------------------------------------------
# rows


def row(out: Path, name: str, key: Callable[[Path, str], str] | None) -> tuple[str, str, str]:
    """(name, status, detail) of one check."""
    skip = out / f"{name}.skip"
    if skip.exists():
        return name, SKIP, shorten(read_text(skip)) or "skipped"
    rc_fields = read_text(out / f"{name}.rc").split()
    if not rc_fields:
        return name, FAIL, "did not run (the script stopped before it, or it left no exit code)"
    try:
        rc = int(rc_fields[0])
    except ValueError:
        return name, FAIL, f"garbled exit code {shorten(rc_fields[0], 20)!r}"
    if rc in TIMEOUT_CODES:
        limit = rc_fields[2] if len(rc_fields) > 2 else "?"
        return name, FAIL, f"timed out after {limit} s; last line: {last_error_line(out, name)}"
    if rc != 0:
        return name, FAIL, f"exit {rc}: {last_error_line(out, name)}"
    if key is None:
        return name, PASS, "exit 0"
    try:
        return name, PASS, shorten(key(out, name), 140)
    except Unreadable as error:
        return name, FAIL, shorten(str(error))


def agreement(rows: dict[str, tuple[str, str, str]], out: Path, rel_tol: float) -> tuple[str, str, str]:
    """The 20-step runs' losses, step by step, against the one-GPU run's: max |a - b| / |b|."""
    name = "agree_2gpu"
    skipped = [n for n in AGREEMENT if rows.get(n, ("", FAIL))[1] == SKIP]
    if skipped:
        return name, SKIP, rows[skipped[0]][2]
    failed = [n for n in AGREEMENT if rows.get(n, ("", FAIL))[1] != PASS]
    if failed:
        return name, FAIL, f"needs {', '.join(failed)} to pass first"
    try:
        reference = read_losses(out / AGREEMENT[0])
        parts, worst = [], 0.0
        for other in AGREEMENT[1:]:
            losses = read_losses(out / other)
            if sorted(losses) != sorted(reference):
                steps = f"{other} logged steps {sorted(losses)[:5]}..., {AGREEMENT[0]} {sorted(reference)[:5]}..."
                return name, FAIL, steps
            diff = max(abs(losses[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in reference)
            worst = max(worst, diff)
            parts.append(f"{other.removeprefix('train_').removesuffix('_20')} {diff:.1e}")
    except (Unreadable, ValueError) as error:
        return name, FAIL, shorten(str(error))
    detail = f"max rel. loss diff vs 1gpu over {len(reference)} steps: {', '.join(parts)} (tol {rel_tol:g})"
    return name, PASS if worst <= rel_tol else FAIL, detail


def summarise(out: Path, rel_tol: float = 2e-3) -> list[tuple[str, str, str]]:
    """Every row of KEYS in order, then any other check found in `out`."""
    rows: dict[str, tuple[str, str, str]] = {}
    for name, key in KEYS.items():
        rows[name] = agreement(rows, out, rel_tol) if name == "agree_2gpu" else row(out, name, key)
    found = {p.stem for p in out.glob("*.rc")} | {p.stem for p in out.glob("*.skip")}
    extra = sorted(found - set(KEYS))
    for name in extra:
        rows[name] = row(out, name, None)
    return list(rows.values())


def format_table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'check':<{width}}  {'':<4}  key number / last error line", "-" * (width + 40)]
    lines += [f"{name:<{width}}  {status:<4}  {detail}" for name, status, detail in rows]
    counts = {s: sum(r[1] == s for r in rows) for s in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the gpu-check output folder")
    parser.add_argument("--rel-tol", type=float, default=2e-3, help="agree_2gpu's tolerance on the loss")
    parser.add_argument("--note", action="append", default=[], help="a line to print above the table")
    args = parser.parse_args(argv)
    rows = summarise(args.out, args.rel_tol)
    table = "\n".join([*args.note, format_table(rows)])
    print(table)
    try:
        (args.out / "summary.txt").write_text(table + "\n")
    except OSError:
        pass
    return 1 if any(status == FAIL for _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
