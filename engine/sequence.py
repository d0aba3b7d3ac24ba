"""A request's state inside the engine: its tokens, how many have KV in the pool, and its pages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str  # one choice of one request (the frontend's "req-3/1")
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; preemption picks the newest
    token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    # KV state: tokens [0, num_computed_tokens) have K/V in the pages listed in logical order.
    num_computed_tokens: int = 0
    pages: list[int] = field(default_factory=list)
    # Windowed layers' pages (engine/kv_cache.py), by the same logical index; SCRATCH_PAGE for pages that
    # left the window, and none yet past the tokens scheduled so far. Empty when every layer keeps every page.
    window_pages: list[int] = field(default_factory=list)
    num_tree_pages: int = 0  # leading pages owned by the prefix cache
    cache_node: Any = None  # prefix-cache handle this sequence keeps locked
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    matcher: Any = None  # llguidance matcher of a constrained sequence (structured.py)
    # Speculative decoding: tokens proposed for this step (scored after the last known token, not yet part of
    # `token_ids`), and the proposer's history of this sequence (engine/spec/base.py).
    draft_token_ids: list[int] = field(default_factory=list)
    # A sampled draft's distributions (a draft model's q over its vocabulary, one per draft token, in order):
    # verification keeps such a token with probability min(1, p/q). Empty where the proposer was certain.
    draft_probs: list[torch.Tensor] = field(default_factory=list)
    spec: Any = None
    # Overlap scheduling (engine/overlap.py): the step in flight gives it its last token whatever that token is
    # (max_tokens or the context is reached), so it is not scheduled again.
    awaiting_last_token: bool = False
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def scheduled_tokens(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of this step's input: the known tokens, then the draft."""
        known = self.token_ids[start : start + n]
        return known + self.draft_token_ids[: n - len(known)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        # Only until the prompt has been computed once; a preempted sequence does not redo them.
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
