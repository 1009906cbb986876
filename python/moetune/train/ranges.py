"""Valid ranges of numeric options: the Range type and the check that applies a table of them.

The table itself (`moetune.train.config.RANGES`) lives next to the option definitions, one entry
per numeric option (a test checks that none is missing). A value outside its range, NaN or an
infinity is a ConfigError naming the option, raised by TrainConfig.validate() before anything is
loaded: `--max-grad-norm -1` would otherwise train by gradient ascent, `--lora-alpha 0` learn
nothing, and NaN pass every comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """lo <= v (lo < v if lo_open) and v <= hi (v < hi if hi_open); None = unbounded.
    Every value must also be finite. Lists (e.g. betas) are checked element by element."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def check_ranges(values: dict, ranges: dict[str, Range], error=ValueError) -> None:
    """Raises `error` for the first option whose value (or list element) is outside its range
    (None = unset: allowed where the option is optional, which the type check decides)."""
    for name, r in ranges.items():
        v = values[name]
        if v is None:
            continue
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if not r.contains(x):
                each = " (each element)" if isinstance(v, (list, tuple)) else ""
                raise error(f"{name} must be {r}{each} and finite, got {v!r}")
