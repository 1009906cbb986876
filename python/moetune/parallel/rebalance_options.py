"""The options of moving experts between ranks during training (moetune.parallel.rebalance): the one
place their defaults live (moetune train's ep_rebalance_every / ep_rebalance_min_gain derive from it)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RebalanceOptions:
    """every: optimizer steps between rebalances (0: never, ownership fixed for the run);
    min_gain: a layer moves only if its busiest rank's predicted load drops by more than this
    fraction of it (0 <= min_gain < 1)."""

    every: int = 0
    min_gain: float = 0.1

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"RebalanceOptions.every must be an int >= 0 (0: never), got {self.every!r}")
        if not 0.0 <= float(self.min_gain) < 1.0:
            raise ValueError(f"RebalanceOptions.min_gain must be in [0, 1), got {self.min_gain!r}")
