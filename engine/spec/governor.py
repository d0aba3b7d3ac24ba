"""Whether speculating pays on this machine, for this model and load: measured, not assumed.

Scoring k drafted tokens costs a step of 1 + k rows per sequence. Where the weights' read dominates a step
(a GPU, float weights), that is almost free; where the kernels are compute-bound (int4/int8 on an AVX2 CPU,
kernels/quant_linear.py: 4 rows cost ~2.5x one) it pays only with long accepted runs. So the engine times its
decoding steps, with and without drafts, per batch-size class, and keeps speculating only while steps with
drafts yield more tokens per second than steps without; every `explore_every`-th decision tries the other
choice, so a change of workload (a copy-heavy request arriving) is noticed.
"""

from __future__ import annotations


def _size_class(batch: int) -> int:
    return min(batch, 32).bit_length()  # 1, 2-3, 4-7, 8-15, 16-31, 32+


class Governor:
    def __init__(self, explore_every: int = 16, smoothing: float = 0.3) -> None:
        self.explore_every = explore_every
        self.smoothing = smoothing
        self.rates: dict[tuple[bool, int], float] = {}  # (speculated, size class) -> tokens per second
        self.decisions = 0

    def allow(self, batch: int) -> bool:
        """Whether the next step of about `batch` decoding sequences should carry drafts."""
        self.decisions += 1
        size = _size_class(batch)
        spec, plain = self.rates.get((True, size)), self.rates.get((False, size))
        if spec is None or plain is None:
            return spec is None  # measure speculation first, then one plain step
        better = spec >= plain
        return better != (self.decisions % self.explore_every == 0)

    def record(self, speculated: bool, batch: int, tokens: int, seconds: float) -> None:
        """A decoding step (no prefill in it) of `batch` sequences made `tokens` tokens in `seconds`."""
        key = (speculated, _size_class(batch))
        rate = tokens / max(seconds, 1e-9)
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (1 - self.smoothing) * old + self.smoothing * rate
