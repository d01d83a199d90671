"""Progress bars for long work (searches, training, latency measurement).

On a terminal (or in a notebook) they are tqdm's bars, unchanged. Anywhere else — a CI log, a Ray
worker, `> log 2>&1` — a redrawn bar would be one endless line of carriage returns, so the bar
writes whole lines instead: its state when it starts, then at most one line every `interval`
seconds (30 by default), and its final state when it closes.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm as _std_tqdm
from tqdm.auto import tqdm as _auto_tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, *, file=None, interval: float = LOG_INTERVAL_S, **kwargs):
    """A tqdm bar on a terminal or in a notebook; a `LogBar` on any other stream (stderr by default).

    Takes tqdm's arguments (`total`, `initial`, `desc`, `unit`, `disable`, ...)."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream) or _in_notebook():
        return _auto_tqdm(iterable, file=file, **kwargs)
    return LogBar(iterable, file=stream, interval=interval, **kwargs)


class LogBar(_std_tqdm):
    """tqdm's bookkeeping and format, written as whole lines at most every `interval` seconds, plus
    the first and the final state."""

    clock = staticmethod(time.monotonic)

    def __init__(self, iterable=None, *, file, interval: float = LOG_INTERVAL_S, **kwargs):
        self._out, self._interval, self._last, self._done = file, interval, None, False
        kwargs.setdefault("ascii", True)
        kwargs["mininterval"] = 0.0          # every update reaches display(), which keeps the pace
        super().__init__(iterable, file=_Discard(), **kwargs)

    def display(self, msg=None, pos=None):
        if self._done or msg == "":          # "" clears a bar on a terminal: nothing to do in a log
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self._interval:
            return True
        self._last = now
        self._write(self.__str__() if msg is None else msg)
        return True

    def close(self):
        if self.disable:
            return
        if not self._done and getattr(self, "n", None) is not None:
            self._write(self.__str__())      # the final state, whatever the pace
        self._done = True
        super().close()

    def _write(self, line: str) -> None:
        try:
            self._out.write(line.rstrip("\r\n") + "\n")
            self._out.flush()
        except ValueError:                   # the stream was closed under us (interpreter exit)
            self._done = True


class _Discard:
    """Where tqdm's own terminal writes go (carriage returns, clearing); LogBar writes the lines."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:                       # closed stream
        return False


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})
