"""Progress without a terminal: whole lines every 5% with rate and time left, never a carriage return."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import CPU, FAKE, SMALL
from tqdm import tqdm

from alexnet2gpu.config import TrainConfig
from alexnet2gpu.progress import LineBar, progress_bar
from alexnet2gpu.train import loop


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_one_line_per_five_percent() -> None:
    log = io.StringIO()
    with progress_bar(total=200, desc="epoch 1/1", unit="step", file=log) as bar:
        assert isinstance(bar, LineBar)
        for _ in range(200):
            bar.update(1)
            bar.set_postfix(loss="1.000")
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 21  # 0%, 5%, ..., 100%
    assert lines[0].startswith("epoch 1/1: 0/200 (0%)") and lines[-1].startswith("epoch 1/1: 200/200 (100%)")
    assert "step/s" in lines[-1] and "loss=1.000" in lines[-1]


def test_a_terminal_keeps_tqdms_bar() -> None:
    bar = progress_bar(total=10, file=Terminal())
    assert type(bar) is tqdm
    bar.close()


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path: Path, capsys) -> None:
    config = TrainConfig(epochs=1, batch_size=8, val_subset=8, log_every=1)
    loop.train(SMALL, FAKE, config, CPU, tmp_path, progress=True, tensorboard=False)
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/1: 2/2 (100%)" in err
