"""What the engine hands back: per-step deltas (engine -> frontend) and finished request outputs."""

from __future__ import annotations

import dataclasses
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
    # Speculative decoding: draft tokens scored in this step, and how many of them were kept.
    num_draft_proposed: int = 0
    num_draft_accepted: int = 0

    def extended_by(self, later: StepOutput) -> StepOutput:
        """This output followed by `later` of the same sequence and step (a speculating row's tokens)."""
        return dataclasses.replace(
            self,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_logprobs=self.new_logprobs + later.new_logprobs,
            finished=later.finished,
            finish_reason=later.finish_reason,
        )


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # Speculative decoding's draft tokens kept and dropped (OpenAI reports predicted outputs' under these names).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

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
