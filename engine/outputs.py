"""What the engine hands back: per-step deltas (engine -> frontend) and finished request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

# (logprob of the chosen token, [(token id, logprob) of the top alternatives])
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class StepOutput:
    """New tokens of one sequence after one engine step; small and picklable for the server process split."""

    seq_id: str  # the frontend's per-choice id ("http-3/1"), not the request's
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first token
    error: str | None = None  # set when the engine could not serve the sequence


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    usage: Usage
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
