"""Progress for long loops: a tqdm bar in a terminal; elsewhere (a file, a pipe, CI logs) one plain line every
few seconds, never a stream of carriage-return frames (a 200-item `roe eval` wrote ~100 KB of them to a log)."""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 5.0  # seconds between progress lines outside a terminal


class LineProgress:
    """tqdm's update / set_postfix / close, written as `desc: n/total (elapsed)` lines at most every few seconds."""

    def __init__(self, total: int | None = None, desc: str = "", file=None, every: float = LINE_EVERY_S):
        self.total, self.desc, self.n, self.every = total, desc, 0, every
        self.file = file if file is not None else sys.stderr
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of} ({time.monotonic() - self.start:.0f}s{extra})", file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if time.monotonic() - self.start >= self.every:  # a loop that took a while reports its end too
            self._line()


def progress(total: int | None = None, desc: str = "", leave: bool = True, disable: bool = False, file=None):
    """A tqdm bar when `file` (default stderr) is a terminal, a LineProgress otherwise; disable: neither."""
    stream = file if file is not None else sys.stderr
    if disable:
        return LineProgress(total, desc, stream, every=float("inf"))
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=leave, file=stream)
    return LineProgress(total, desc, stream)
