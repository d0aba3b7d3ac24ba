"""What a proposer does: guess the next few tokens of decoding sequences, cheaply, so that one target step
scores them all (engine/llm_engine.py verifies: the longest prefix the target agrees with is kept, plus one
token of the target's own).

Every proposer gets the same adaptive length: a sequence whose recent drafts were mostly rejected gets
shorter ones, one whose draft was kept whole a token more next time (up to k), and one whose acceptance stays
below `min_acceptance` stops speculating for a while (8 steps, doubling up to 256 each time it fails again),
so a workload where guessing does not pay costs little more than plain decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.sequence import Sequence

_FIRST_PAUSE, _LONGEST_PAUSE = 8, 256


@dataclass
class SpecState:
    """A sequence's speculation history (kept on the sequence, so it goes when the sequence goes)."""

    accepted: float  # moving average of the tokens accepted per verification
    rate: float = 1.0  # moving average of accepted / proposed
    paused: int = 0  # steps left without proposals
    pause: int = _FIRST_PAUSE  # the next pause's length
    extra: Any = field(default=None)  # the proposer's own per-sequence state (an n-gram index)


class Proposer:
    def __init__(
        self, num_tokens: int = 3, adaptive: bool = True, min_acceptance: float = 0.3, only_when_faster: bool = True
    ) -> None:
        self.num_tokens = num_tokens
        self.adaptive = adaptive
        self.min_acceptance = min_acceptance
        self.only_when_faster = only_when_faster  # engine/spec/governor.py

    @property
    def enabled(self) -> bool:
        return True

    def describe(self) -> str:
        return f"num_tokens={self.num_tokens}, adaptive={self.adaptive}, only_when_faster={self.only_when_faster}"

    def attach(self, cfg: Any, target_vocab_size: int) -> None:  # noqa: B027 (optional hook)
        """Called once by the engine with its config (a proposer with a model of its own loads it here)."""

    def forget(self, seq: Sequence) -> None:  # noqa: B027 (optional hook)
        """`seq` has finished or was aborted: drop what the proposer holds for it beyond `seq.spec`."""

    def state(self, seq: Sequence) -> SpecState:
        if seq.spec is None:
            seq.spec = SpecState(accepted=float(self.num_tokens))
        return seq.spec

    def length(self, seq: Sequence) -> int:
        """How many tokens to propose for `seq` now: k, fewer after rejections, 0 while paused."""
        if not self.adaptive:
            return self.num_tokens
        s = self.state(seq)
        if s.paused:
            s.paused -= 1
            return 0
        return min(self.num_tokens, math.floor(s.accepted) + 1)

    def observe(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """After a verification: `accepted` of the `proposed` tokens were the target's."""
        if not self.adaptive or proposed == 0:
            return
        s = self.state(seq)
        # A draft kept whole earns one token more next time. As a moving average alone, the length stayed below
        # the accepted length's limit: one rejection then held a copying sequence at 4 of k=7 tokens for ~50 steps.
        s.accepted = max(s.accepted, accepted) if accepted == proposed else 0.5 * s.accepted + 0.5 * accepted
        s.rate = 0.5 * s.rate + 0.5 * accepted / proposed
        if s.rate < self.min_acceptance:
            s.paused, s.pause = s.pause, min(2 * s.pause, _LONGEST_PAUSE)
            s.rate, s.accepted = 1.0, float(self.num_tokens)  # a fresh try after the pause
        elif accepted:
            s.pause = _FIRST_PAUSE

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Drafts for decoding sequences (each ends at its last known token), each at most its limit long and
        at most `length(seq)`; empty where there is no guess."""
        return [self._propose(s, min(n, self.length(s))) if n > 0 else [] for s, n in zip(seqs, limits)]

    def _propose(self, seq: Sequence, n: int) -> list[int]:
        """Up to `n` tokens that might follow `seq.token_ids` (n may be 0): what a proposer that guesses one
        sequence at a time implements; one that guesses for the batch at once overrides `propose` instead."""
        raise NotImplementedError(f"{type(self).__name__} implements neither propose nor _propose")


class NoSpeculation(Proposer):
    """spec=none: every step decodes one token per sequence."""

    def __init__(self, **settings: Any) -> None:
        # A sweep (`-m spec=none,ngram spec.num_tokens=2,4`) sets the other choices' keys here too.
        super().__init__()

    @property
    def enabled(self) -> bool:
        return False

    def describe(self) -> str:
        return "none"

    def _propose(self, seq: Sequence, n: int) -> list[int]:
        return []
