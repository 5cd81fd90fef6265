"""How long a CPU training will take, said once from its first steps, with the options that fit in less.

A user who runs the recipe on a machine without a usable GPU would otherwise wait about 90
hours before learning anything; the first dozen steps are enough to tell them.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU_HOURS_WARNING = 3600.0  # seconds of training on the CPU from which a run says how long, and what fits
PACE_BATCHES = 10  # measured batches (after the first, which builds and warms up) before estimating
# ... or sooner, once this long has been measured over at least two batches: VGG19 at 224 takes
# 30 s a batch on two cores, and ten of them kept the warning back for six minutes.
PACE_SECONDS = 60.0


@dataclass
class Pace:
    """Measures the first steps of a CPU training and says once if the rest would take more than an hour."""

    remaining: int  # images every epoch still to do will train on
    batches: int = 0
    images: int = 0
    started: float | None = None
    said: bool = False

    def step(self, images: int, now: float) -> str | None:
        """Note a finished batch of `images`; the warning, the one time it applies."""
        self.batches += 1
        if self.started is None:  # the first batch pays for graph optimisation and warm-up
            self.started, self.remaining = now, self.remaining - images
            return None
        self.images += images
        measured = self.batches - 1
        enough = measured >= PACE_BATCHES or (measured >= 2 and now - self.started >= PACE_SECONDS)
        if self.said or not enough or now <= self.started:
            return None
        self.said = True
        rate = self.images / (now - self.started)
        return cpu_estimate_warning(rate, self.remaining - self.images, self.images, CPU_HOURS_WARNING)


def cpu_estimate_warning(rate: float, remaining: int, measured: int, limit: float = CPU_HOURS_WARNING) -> str | None:
    """What a user should know before waiting hours: the estimate, and the options that fit in less."""
    seconds = remaining / rate
    if seconds <= limit:
        return None
    return (
        f"training on the CPU: about {seconds / 3600:.1f} h to go at {rate:.1f} images/s (measured over "
        f"{measured} images); a GPU machine does this in minutes (`pip install 'tnflow[gpu]'` there), or smaller "
        "options fit on this one: --model mobilenet35v2 --image-size 96"
    )
