"""Progress of long stages: a tqdm bar on a terminal, periodic log lines otherwise.

    bar = progress(total, "keys train", "chunk")
    bar.update(n); ...; bar.close()
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("data_pipeline")


class LogProgress:
    """tqdm's update/close for logs (no TTY): a line every `interval` s and at the end, with
    the rate and, when the total is known, the ETA."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self.logged_n = 0
        self.start = self.last = time.perf_counter()

    def _log(self, now: float) -> None:
        self.logged_n = self.n
        rate = self.n / max(now - self.start, 1e-9)
        eta = (f", ETA {(self.total - self.n) / rate:.0f}s" if self.total and rate > 0
               else "")
        of = f"/{self.total:,}" if self.total else ""
        log.info("%s: %s%s %s (%.1f %s/s%s)", self.desc, f"{self.n:,}", of, self.unit, rate,
                 self.unit, eta)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._log(now)

    def close(self) -> None:
        if self.n != self.logged_n or self.n == 0:
            self._log(time.perf_counter())


def progress(total: int | None, desc: str, unit: str):
    """A tqdm bar (rate, ETA) on a terminal, periodic log lines otherwise."""
    if not sys.stderr.isatty():
        return LogProgress(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
