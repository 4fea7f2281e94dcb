"""Every experiment runs from its command at the tiny size and appends a well-formed entry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXPERIMENTS = ["seed_run", "towers_vs_one", "relu_vs_tanh", "ablations", "kernels"]
pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_smoke(tmp_path: Path, name: str) -> None:
    results = tmp_path / "RESULTS.md"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / f"{name}.py"),
        "--size",
        "tiny",
        "--devices",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)  # this tree's code
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("## Experiment") and "(tiny size, CPU)" in text
    assert "- command: `python " in text and "- machine: " in text
    assert "|---|" in text
    for image in [line for line in text.splitlines() if line.startswith("![")]:
        assert (results.parent / image.split("(")[1].rstrip(")")).is_file()


def test_jpeg_settings_tables_every_setting(tmp_path: Path) -> None:
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.radial_gradient("L").convert("RGB").resize((300, 200)).save(photo, quality=95)
    cmd = [sys.executable, str(ROOT / "experiments" / "jpeg_settings.py"), "--images", "4", "--rounds", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*cmd, "--photos", str(photo)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows][0] == "quality 95 (default)" and len(rows) == 7
    kb = {(r[0].strip(), r[1].strip()): float(r[2]) for r in rows}
    assert kb[("quality 90", "4:2:0")] < kb[("quality 95", "4:2:0")] < kb[("quality 95 (default)", "4:4:4")]
    for row in rows:
        assert float(row[3].strip().rstrip("x")) > 0
        assert 0 < float(row[4]) < 10 and 0 <= float(row[5]) < 10  # generated photos, then photo.jpg
