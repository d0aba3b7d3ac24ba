"""Overlap scheduling (config `overlap`; SGLang's and Mini-SGLang's overlap loop): the host schedules, prepares and
launches step N+1 before it reads step N's tokens, then reads them and finishes what they finish.

    schedule N+1 -> launch N+1 (its inputs, kernels, sampling) -> read N's tokens -> append, stop, free N's rows

Step N+1 is prepared before N's tokens are known: a sequence that samples in N holds a placeholder for that token
(-1 - j: the j-th token N samples), and the device fills it in from N's sampled-token tensor when N+1's inputs are
built (`fill_placeholders`, no host read). On a GPU, whose kernels run behind the host's back, the device then
computes step N+1 while the host reads N's tokens and does its Python for them; the read that ends step N waits
only for N. On a CPU, where each kernel runs as it is called, nothing overlaps: the host's work for a step is ~3%
of a SmolLM2 batch-1 step and ~1% of a 32-sequence one here, and running the step on a thread of its own (which is
how it could overlap there) made it 3.5x slower (docs/performance.md, 2026-12-07), so `overlap` stays off on CPU.

What it costs: a sequence that ends on step N's token (EOS, a stop token, an abort) is computed once more in N+1,
and that token is dropped. One that ends by length is known to end and is not scheduled again
(`Sequence.awaiting_last_token`). Steps whose sampling needs the host's view of a sequence's latest token (a
grammar's mask, penalties over the output so far) or that gather prompt logprobs run without overlap
(engine/llm_engine.py).

Pages stay valid though the host frees pages while step N+1 is in flight: a page freed then is handed out again no
earlier than when N+2 is scheduled, and written only by N+2 or later, which the device runs after N+1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampler import Sampled
from engine.sequence import Sequence


def fill_placeholders(ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """`ids` with each placeholder -1 - j replaced by `previous[j]`, on the device."""
    return torch.where(ids < 0, previous[(-1 - ids).clamp(min=0)], ids)


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read: the sequences it samples for, where each one's
    placeholder sits in its `token_ids`, and the sampler's result on the device."""

    sampled: list[Sequence]
    placeholders: list[int]
    result: Sampled

    @classmethod
    def hold(cls, sampled: list[Sequence], result: Sampled) -> InFlight:
        """Put each sampling sequence's placeholder in place."""
        placeholders = []
        for j, seq in enumerate(sampled):
            placeholders.append(len(seq.token_ids))
            seq.token_ids.append(-1 - j)
        return cls(sampled, placeholders, result)
