"""Frontend bookkeeping shared by the in-process `LLM` and the HTTP server: one tracked request per
user request, one engine sequence per choice (n), text via `TextState`, stop strings turned into aborts."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.outputs import CompletionOutput, RequestOutput, StepOutput, TokenLogprob, Usage
from engine.sampling_params import SamplingParams
from engine.tokenizer import TextState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Completion:
    """Frontend state of one engine sequence (one of a request's n choices)."""

    index: int
    seq_id: str
    text: TextState
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


# Called for every engine output of a choice: (choice, newly visible text, the raw output).
Sink = Callable[[Completion, str, StepOutput], None]


@dataclass
class TrackedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[Completion]
    sink: Sink | None = None
    num_cached_tokens: int = 0
    num_draft_proposed: int = 0
    num_draft_accepted: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def sequences(self) -> list[tuple[str, SamplingParams]]:
        """(sequence id, params) per choice; seeded choices get consecutive seeds so they differ."""
        return [
            (
                c.seq_id,
                self.params
                if self.params.seed is None
                else dataclasses.replace(self.params, seed=self.params.seed + c.index),
            )
            for c in self.choices
        ]

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    c.index, c.text.text, c.token_ids, c.finish_reason, c.logprobs if self.params.logprobs else None
                )
                for c in self.choices
            ],
            usage=Usage(
                len(self.prompt_token_ids),
                sum(len(c.token_ids) for c in self.choices),
                self.num_cached_tokens,
                self.num_draft_accepted,
                self.num_draft_proposed - self.num_draft_accepted,
            ),
            prompt_logprobs=self.prompt_logprobs,
        )


class OutputProcessor:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, abort_sequence: Callable[[str], None], prefix: str = "req"
    ) -> None:
        self.tokenizer = tokenizer
        self.abort_sequence = abort_sequence  # tells the engine to stop one sequence
        self.live: dict[str, tuple[TrackedRequest, Completion]] = {}  # sequence id -> owner
        self._ids = itertools.count()
        self._prefix = prefix

    def track(
        self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, sink: Sink | None = None
    ) -> TrackedRequest:
        rid = f"{self._prefix}-{next(self._ids)}"
        choices = [
            Completion(
                i,
                f"{rid}/{i}",
                TextState(self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens),
            )
            for i in range(params.n)
        ]
        req = TrackedRequest(rid, prompt, prompt_token_ids, params, choices, sink)
        for c in choices:
            self.live[c.seq_id] = (req, c)
        return req

    def process(self, out: StepOutput) -> None:
        owner = self.live.get(out.seq_id)
        if owner is None:  # aborted by the frontend while the step was running
            return
        req, c = owner
        c.token_ids.extend(out.new_token_ids)
        c.logprobs.extend(out.new_logprobs)
        req.num_cached_tokens = max(req.num_cached_tokens, out.num_cached_tokens)
        req.num_draft_proposed += out.num_draft_proposed
        req.num_draft_accepted += out.num_draft_accepted
        if out.prompt_logprobs is not None:
            req.prompt_logprobs = out.prompt_logprobs
        delta = c.text.update(out.new_token_ids, out.finished)
        if c.text.stopped and not out.finished:
            self.abort_sequence(c.seq_id)
        if out.finished or c.text.stopped:
            c.finish_reason = "stop" if c.text.stopped else out.finish_reason
            del self.live[c.seq_id]
        if req.sink is not None:
            req.sink(c, delta, out)

    def abort(self, req: TrackedRequest, reason: str = "abort") -> None:
        """Stop every unfinished choice of `req` in the engine and forget it."""
        for c in req.choices:
            if self.live.pop(c.seq_id, None) is not None:
                self.abort_sequence(c.seq_id)
                c.finish_reason = reason

    def fail_all(self, message: str) -> None:
        """The engine is gone: end every live choice with an error."""
        for sid, (req, c) in list(self.live.items()):
            del self.live[sid]
            c.finish_reason = "error"
            if req.sink is not None:
                req.sink(c, "", StepOutput(sid, [], finished=True, finish_reason="error", error=message))
