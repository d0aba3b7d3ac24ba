"""Whether speculating pays on this machine, for this model and load: measured, not assumed.

Scoring k drafted tokens costs a step of 1 + k rows per sequence. Where the weights' read dominates a step
(a GPU, float weights), that is almost free; where the kernels are compute-bound (int4/int8 on an AVX2 CPU,
kernels/quant_linear.py: 4 rows cost ~2.5x one) it pays only with long accepted runs. So the engine times its
decoding steps, with and without drafts, per batch-size class, and keeps speculating only while steps with
drafts yield more tokens per second than steps without. Now and then a decision tries the other choice, so a
change of workload (a copy-heavy request arriving) is noticed: after `explore_every` decisions, then after twice
as many each time the try confirms the choice, up to `explore_at_most_every`. A fixed 1 in 16 cost 15% at 32
sequences of free chat on AVX2, where a step with drafts took ~3x one without (2026-12-06).
"""

from __future__ import annotations

from dataclasses import dataclass


def _size_class(batch: int) -> int:
    return min(batch, 32).bit_length()  # 1, 2-3, 4-7, 8-15, 16-31, 32+


@dataclass
class _Exploration:
    choice: bool  # the choice the rates favoured at the last decision
    gap: int  # decisions between tries of the other choice
    left: int  # decisions left until the next try


class Governor:
    def __init__(self, explore_every: int = 16, explore_at_most_every: int = 256, smoothing: float = 0.3) -> None:
        self.explore_every = explore_every
        self.explore_at_most_every = explore_at_most_every
        self.smoothing = smoothing
        self.rates: dict[tuple[bool, int], float] = {}  # (speculated, size class) -> tokens per second
        self.explorations: dict[int, _Exploration] = {}  # by size class

    def allow(self, batch: int) -> bool:
        """Whether the next step of about `batch` decoding sequences should carry drafts."""
        size = _size_class(batch)
        spec, plain = self.rates.get((True, size)), self.rates.get((False, size))
        if spec is None or plain is None:
            return spec is None  # measure speculation first, then one plain step
        better = spec >= plain
        e = self.explorations.setdefault(size, _Exploration(better, self.explore_every, self.explore_every))
        if better != e.choice:  # the rates changed their verdict: try the other choice often again
            e.choice, e.gap, e.left = better, self.explore_every, self.explore_every
        e.left -= 1
        if e.left > 0:
            return better
        e.gap = min(2 * e.gap, self.explore_at_most_every)
        e.left = e.gap
        return not better

    def record(self, speculated: bool, batch: int, tokens: int, seconds: float) -> None:
        """A decoding step (no prefill in it) of `batch` sequences made `tokens` tokens in `seconds`."""
        key = (speculated, _size_class(batch))
        rate = tokens / max(seconds, 1e-9)
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (1 - self.smoothing) * old + self.smoothing * rate
