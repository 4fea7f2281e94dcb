"""Progress bars that read well where they are written: tqdm's bar on a terminal, and one plain line
every few percent (with the rate and the time left) in a log file, where a bar's carriage returns would
pile up into megabytes of one unreadable line (a cluster job, `make train-1gpu > log`)."""

from __future__ import annotations

import sys

from tqdm import tqdm

LINE_EVERY = 0.05  # a log file gets a line at each 5% of the work
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _WholeLines:
    """A stream that takes whole lines only: tqdm's own bare "\r" and "\n" (at close) are dropped."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class LineBar(tqdm):
    """tqdm without a terminal: a whole line at each `LINE_EVERY` of the total, never a carriage return."""

    def __init__(self, *args, **kwargs) -> None:
        self._shown = None
        kwargs.update(mininterval=0, miniters=1, dynamic_ncols=False, bar_format=LINE_FORMAT)
        kwargs["file"] = _WholeLines(kwargs.get("file") or sys.stderr)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # a bar with leave=False clearing itself: nothing to clear in a log
            return True
        mark = int(self.n / self.total / LINE_EVERY) if self.total else self.n
        if mark != self._shown:
            self._shown = mark
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        return True


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm bar, or a `LineBar` when its stream (stderr unless `file` is given) is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    terminal = getattr(stream, "isatty", lambda: False)()
    return tqdm(*args, **kwargs) if terminal or kwargs.get("disable") else LineBar(*args, **kwargs)
