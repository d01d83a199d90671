"""Sharing a CPU machine between benchmarks (imported by the benchmarks run from this folder).

On a shared machine the convention is one lock file (default /tmp/attnc-cpu.lock, --cpu-lock ""
to run without it): long computations hold it shared, latency timing holds it exclusive and only
for short windows. One CpuLock per process, on one open file, so a process's own shared hold never
blocks its own exclusive windows:

    lock = CpuLock("/tmp/attnc-cpu.lock")
    lock.share()                  # compute beside the other shared holders
    with lock.quiet():            # a timing window: exclusive, then back to shared
        ...
    cb = lock.yielder()           # a trainer callback: steps aside while a timing window waits

flock(2) does not queue an exclusive request ahead of later shared ones, so a process that holds
the lock shared for a long time steps aside (yielder) when /proc/locks shows an exclusive request
waiting on the file, until that request has got the lock (and then waits for it to end).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
import warnings


def exclusive_waiting(f) -> bool:
    """Whether /proc/locks shows a process waiting for an exclusive lock on open file f (Linux)."""
    ino = os.fstat(f.fileno()).st_ino
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                parts = line.split()
                if "->" in parts and "WRITE" in parts and any(p.endswith(f":{ino}") for p in parts):
                    return True
    except OSError as e:   # (shown once: Python's default warning filter)
        warnings.warn(f"cannot read /proc/locks ({e.strerror}): a long shared holder will not step aside "
                      "for waiting timing windows", RuntimeWarning, stacklevel=2)
        return False
    return False


class CpuLock:
    def __init__(self, path: str | None, *, max_wait: float | None = None, pause_pids=()):
        """max_wait: give up waiting for the exclusive lock after this many seconds and time anyway
        (counted in .windows["not_exclusive"]; None: wait as long as it takes). pause_pids: your own
        processes to stop (SIGSTOP) during every window and continue (SIGCONT) after it."""
        self.path = path or None
        self.f = open(path, "a") if path else None
        self.mode = None
        self.max_wait = max_wait
        self.pause_pids = [int(p) for p in pause_pids]
        self.waited_s = 0.0           # total time spent waiting for the exclusive lock
        self.windows = {"exclusive": 0, "not_exclusive": 0}

    def _exclusive(self) -> bool:
        if self.f is None:
            return False
        if self.max_wait is None:
            fcntl.flock(self.f, fcntl.LOCK_EX)
            return True
        end = time.monotonic() + self.max_wait
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > end:
                    return False
                time.sleep(0.2)

    def _signal(self, sig) -> None:
        for pid in self.pause_pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

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
        if before == "shared" and self.max_wait is not None:
            self.release()            # a non-blocking try must not meet our own shared hold
        t0 = time.monotonic()
        got = self._exclusive()
        self.waited_s += time.monotonic() - t0
        self.windows["exclusive" if got else "not_exclusive"] += 1
        self.mode = "exclusive" if got else None
        self._signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._signal(signal.SIGCONT)
            if before == "shared":
                self.share()
            else:
                self.release()

    def yielder(self, check_every: float = 0.5, patience: float = 5.0, cooldown: float = 30.0):
        """A trainer callback (on_step): held shared, it checks (at most every `check_every` s)
        whether an exclusive request waits on the lock; if so it lets go until the request has got
        the lock, then takes it shared again, which waits for the exclusive holder to finish. When
        the request has not got it after `patience` s (others hold the lock too), it takes the lock
        back and looks again only after `cooldown` s."""
        lock = self

        class _Yield:
            last = 0.0

            def on_step(self, step, loss, state):
                now = time.monotonic()
                if lock.f is None or lock.mode != "shared" or now - self.last < check_every:
                    return
                self.last = now
                if exclusive_waiting(lock.f):
                    lock.release()
                    t0 = time.monotonic()
                    while exclusive_waiting(lock.f) and time.monotonic() - t0 < patience:
                        time.sleep(0.1)
                    if time.monotonic() - t0 >= patience:
                        self.last = time.monotonic() + cooldown
                    lock.share()

        return _Yield()
