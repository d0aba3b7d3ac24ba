"""Per-request sampling parameters, named as in the OpenAI API (and vLLM where OpenAI has no name)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

MAX_TOP_LOGPROBS = 20


class InvalidParameter(ValueError):
    """A request parameter with a bad value; `param` names it (the OpenAI error body's "param")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False  # logprob of each sampled token
    top_logprobs: int = 0  # plus the k most likely alternatives at each step
    prompt_logprobs: int | None = None  # logprob of every prompt token (plus k alternatives)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0  # scheduler=priority admits lower values first (vLLM's convention)
    # Constrained decoding (at most one): the output is a JSON value valid for this JSON schema (a dict or
    # its JSON text; {"type": "object"} for any object), a full match of this regex, or a sentence of this
    # grammar (llguidance's Lark syntax). Generation stops with "stop" once the constraint is complete.
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.top_logprobs:
            self.logprobs = True
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidParameter:
            return InvalidParameter(name, f"invalid {name}={getattr(self, name)!r}: {why}")

        for name in ("n", "max_tokens", "top_k", "top_logprobs", "priority"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(name, "must be an integer")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise bad(name, "must be a number")
        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be positive")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and not (
            isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64
        ):
            raise bad("seed", "must be None or a 64-bit integer")

        self._validate_constraint()

    def _validate_constraint(self) -> None:
        given = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidParameter(given[1], f"invalid {given[1]}: only one of json_schema, regex, grammar may be set")
        if not given:
            return
        from engine.structured import grammar_error, grammar_of

        name = given[0]
        value = getattr(self, name)
        if name == "json_schema" and isinstance(value, str):
            try:
                self.json_schema = value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameter(name, f"invalid json_schema: not JSON ({e})") from None
        if not isinstance(value, dict if name == "json_schema" else str):
            raise InvalidParameter(
                name, f"invalid {name}: expected {'a JSON object' if name == 'json_schema' else 'a string'}"
            )
        error = grammar_error(grammar_of(self))
        if error is not None:
            raise InvalidParameter(name, f"invalid {name}: {error}")

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameter(unknown[0], f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidParameter unless the request can run to completion in an engine of this shape."""
    if not prompt_token_ids:
        raise InvalidParameter("prompt", "invalid prompt: it has no tokens")
    bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise InvalidParameter("prompt", f"invalid prompt token id(s) {bad[:5]}: must be integers in [0, {vocab_size})")
    if len(prompt_token_ids) >= max_model_len:
        raise InvalidParameter(
            "prompt",
            f"the prompt is too long: {len(prompt_token_ids)} tokens, and the maximum context length is "
            f"{max_model_len} (the prompt and at least one generated token must fit)",
        )
    if len(prompt_token_ids) + params.max_tokens > max_model_len:
        raise InvalidParameter(
            "max_tokens",
            f"invalid max_tokens={params.max_tokens}: prompt ({len(prompt_token_ids)} tokens) "
            f"+ max_tokens exceeds the maximum context length {max_model_len}",
        )
