"""Per-request sampling parameters, named as in the OpenAI API (and vLLM where OpenAI has no name)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

MAX_TOP_LOGPROBS = 20

# The numeric fields' JSON type and bounds: (type, minimum, maximum, minimum exclusive). SamplingParams checks
# them and the OpenAPI document (engine/openapi.py) advertises them from here, so the two cannot differ.
RANGES: dict[str, tuple[str, float | None, float | None, bool]] = {
    "n": ("integer", 1, None, False),
    "max_tokens": ("integer", 1, None, False),
    "temperature": ("number", 0, None, False),  # 0: greedy
    "top_p": ("number", 0, 1, True),
    "top_k": ("integer", -1, None, False),  # 0 or -1: disabled
    "min_p": ("number", 0, 1, False),
    "presence_penalty": ("number", -2, 2, False),
    "frequency_penalty": ("number", -2, 2, False),
    "repetition_penalty": ("number", 0, None, True),
    "top_logprobs": ("integer", 0, MAX_TOP_LOGPROBS, False),
    "priority": ("integer", None, None, False),
}
LOGIT_BIAS_RANGE = (-100, 100)


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
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling, in [-100, 100]
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
        if isinstance(self.logit_bias, dict):  # JSON object keys are strings: "50256" is token 50256
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
        if self.top_logprobs:
            self.logprobs = True
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidParameter:
            return InvalidParameter(name, f"invalid {name}={getattr(self, name)!r}: {why}")

        for name, (kind, low, high, exclusive) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int if kind == "integer" else (int, float)):
                raise bad(name, f"must be {'an integer' if kind == 'integer' else 'a number'}")
            if value != value:
                raise bad(name, "must be a number")
            below = low is not None and (value <= low if exclusive else value < low)
            if below or (high is not None and value > high):
                raise bad(
                    name, f"must be in {'(' if exclusive else '['}{low}, {'inf)' if high is None else f'{high}]'}"
                )
        if self.prompt_logprobs is not None and not (
            isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        if self.logit_bias is not None and not (
            isinstance(self.logit_bias, dict)
            and all(isinstance(k, int) and k >= 0 for k in self.logit_bias)
            and all(_in_bias_range(v) for v in self.logit_bias.values())
        ):
            raise InvalidParameter("logit_bias", "invalid logit_bias: must map token ids to numbers in [-100, 100]")
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

    @property
    def penalised(self) -> bool:
        """Whether sampling reads the tokens so far (presence, frequency or repetition penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameter(unknown[0], f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


def _in_bias_range(value: object) -> bool:
    low, high = LOGIT_BIAS_RANGE
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _token_key(key: object) -> object:
    """A logit_bias key as a token id when it spells one; anything else is left for validation to refuse."""
    if isinstance(key, str) and key.isdigit() and len(key) < 12:
        return int(key)
    return key


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidParameter unless the request can run to completion in an engine of this shape."""
    if not prompt_token_ids:
        raise InvalidParameter("prompt", "invalid prompt: it has no tokens")
    bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise InvalidParameter("prompt", f"invalid prompt token id(s) {bad[:5]}: must be integers in [0, {vocab_size})")
    outside = [t for t in params.logit_bias or () if t >= vocab_size]
    if outside:
        raise InvalidParameter(
            "logit_bias", f"invalid logit_bias token id(s) {outside[:5]}: must be below {vocab_size}"
        )
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
