"""Progress a user can see: a log line every few seconds and a Prefect progress artifact.

Work functions take a plain `progress(done, total)` callable so they stay testable without
Prefect; task wrappers pass a `Progress`, which turns the counts into rate and ETA.
"""

from __future__ import annotations

import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

_SCALE = {"B": (1e6, "MB")}


class Progress:
    """Callable `(done, total)` reporter; logs at most every `interval` seconds."""

    def __init__(self, label: str, unit: str, logger: logging.Logger | logging.LoggerAdapter, interval: float = 5.0):
        self.label, self.unit, self.logger, self.interval = label, unit, logger, interval
        self.start = self.last_report = time.monotonic()
        self.done, self.total, self.detail = 0, None, ""
        self.artifact_id = None
        if TaskRunContext.get() is not None:
            self.artifact_id = create_progress_artifact(progress=0.0, description=label)

    def __call__(self, done: int, total: int | None, detail: str = "") -> None:
        self.done, self.total, self.detail = done, total, detail
        now = time.monotonic()
        if now - self.last_report >= self.interval:
            self.last_report = now
            self._report()

    def finish(self) -> None:
        self._report()

    def _report(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        divisor, unit = _SCALE.get(self.unit, (1, self.unit))
        rate = self.done / elapsed
        fmt = ",.1f" if divisor != 1 else ",.0f"
        line = f"{self.label}{' ' + self.detail if self.detail else ''}: {self.done / divisor:{fmt}}"
        if self.total:
            share = self.done / self.total
            eta = (self.total - self.done) / rate if rate else float("inf")
            line += (
                f"/{self.total / divisor:{fmt}} {unit} ({share:.0%}) at {rate / divisor:,.1f} {unit}/s, ETA {eta:,.0f}s"
            )
            if self.artifact_id is not None:
                update_progress_artifact(self.artifact_id, progress=100.0 * share)
        else:
            line += f" {unit} at {rate / divisor:,.1f} {unit}/s"
        self.logger.info(line)
