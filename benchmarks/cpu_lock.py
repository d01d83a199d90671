"""Sharing a CPU machine between benchmarks (imported by the benchmarks run from this folder).

On a shared machine the convention is one lock file (default /tmp/attnc-cpu.lock, --cpu-lock ""
to run without it): long computations hold it shared, latency timing holds it exclusive and only
for short windows. One CpuLock per process, on one open file, so a process's own shared hold never
blocks its own exclusive windows:

    lock = CpuLock("/tmp/attnc-cpu.lock")
    lock.share()                  # compute beside the other shared holders
    with lock.quiet():            # a timing window: exclusive, then back to shared
        ...
    cb = lock.yielder(seconds=20) # a trainer callback: every 20 s lets a waiting exclusive holder in

flock(2) does not queue an exclusive request ahead of later shared ones, so a process that holds
the lock shared for a long time lets go of it now and then (yielder) for a waiting timing window.
"""
from __future__ import annotations

import contextlib
import fcntl
import time


class CpuLock:
    def __init__(self, path: str | None):
        self.path = path or None
        self.f = open(path, "a") if path else None
        self.mode = None
        self.waited_s = 0.0           # total time spent waiting for the exclusive lock

    def _set(self, op) -> None:
        if self.f is not None:
            fcntl.flock(self.f, op)

    def share(self) -> None:
        self._set(fcntl.LOCK_SH)
        self.mode = "shared"

    def release(self) -> None:
        self._set(fcntl.LOCK_UN)
        self.mode = None

    @contextlib.contextmanager
    def quiet(self):
        """Exclusive for the block (a timing window: keep it under a few minutes), then the mode
        held before (shared or none)."""
        before = self.mode
        t0 = time.monotonic()
        self._set(fcntl.LOCK_EX)
        self.waited_s += time.monotonic() - t0
        self.mode = "exclusive"
        try:
            yield
        finally:
            if before == "shared":
                self.share()
            else:
                self.release()

    def yielder(self, seconds: float = 20.0, pause: float = 1.0):
        """A trainer callback (on_step) that, held shared, lets go every `seconds` for `pause` seconds."""
        lock = self

        class _Yield:
            last = time.monotonic()

            def on_step(self, step, loss, state):
                if lock.mode == "shared" and time.monotonic() - self.last > seconds:
                    lock.release()
                    time.sleep(pause)
                    lock.share()
                    self.last = time.monotonic()

        return _Yield()
