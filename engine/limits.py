"""Bounds on what one request may ask for (`server.limits.*`), checked before a request is tokenized or queued,
by the server and by the offline `LLM` alike, and advertised by the OpenAPI document from the same values.

Without them one request could hold the engine for minutes (n=100000), a body could take the parser down
(100,000 nested brackets: a RecursionError) or fill the engine's pipe. Defaults follow OpenAI's documented
limits where it has one (n, stop, tools, logit_bias values), otherwise bounds no honest client reaches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import InvalidParameter, SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    n: int = 16  # choices per prompt
    stop: int = 4  # stop strings (OpenAI: up to 4)
    stop_length: int = 256  # characters per stop string
    logit_bias: int = 300  # entries
    tools: int = 128  # functions (OpenAI: up to 128)
    schema_bytes: int = 65536  # a response_format or tool parameters schema, as JSON text
    schema_depth: int = 32  # nesting of such a schema
    messages: int = 2048  # messages in one chat request
    body_bytes: int = 8 << 20  # request body; beyond it 413
    json_depth: int = 64  # nesting of the request body
    request_tokens: int = 262144  # a request's total work: prompts x n x (prompt + max_tokens)
    per_client: int | None = None  # requests in flight per client address; None: no limit (429 beyond it)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            ok = value is None if name == "per_client" and value is None else isinstance(value, int) and value >= 1
            if not ok:
                raise ValueError(f"invalid server.limits.{name}={value!r}: must be a positive integer")

    def check_params(self, params: SamplingParams) -> None:
        """The bounds that concern one SamplingParams (InvalidParameter naming the field)."""
        if params.n > self.n:
            raise InvalidParameter("n", f"invalid n={params.n}: at most {self.n} (server.limits.n)")
        if len(params.stop) > self.stop:
            raise InvalidParameter("stop", f"invalid stop: {len(params.stop)} strings, at most {self.stop}")
        long = [s for s in params.stop if len(s) > self.stop_length]
        if long:
            raise InvalidParameter(
                "stop", f"invalid stop: a string of {len(long[0])} characters, at most {self.stop_length}"
            )
        if params.logit_bias and len(params.logit_bias) > self.logit_bias:
            raise InvalidParameter(
                "logit_bias", f"invalid logit_bias: {len(params.logit_bias)} entries, at most {self.logit_bias}"
            )
        if params.json_schema is not None:
            self.check_schema(params.json_schema, "response_format")

    def check_body(self, body: dict[str, Any]) -> None:
        """The bounds on an OpenAI request body's lists that SamplingParams does not hold."""
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > self.messages:
            raise InvalidParameter("messages", f"invalid messages: {len(messages)} of them, at most {self.messages}")
        tools = body.get("tools")
        if not isinstance(tools, list):
            return
        if len(tools) > self.tools:
            raise InvalidParameter("tools", f"invalid tools: {len(tools)} of them, at most {self.tools}")
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and function.get("parameters") is not None:
                self.check_schema(function["parameters"], "tools")

    def check_schema(self, schema: Any, param: str) -> None:
        if len(json.dumps(schema)) > self.schema_bytes:
            raise InvalidParameter(param, f"invalid {param}: the schema is over {self.schema_bytes} bytes as JSON")
        if depth(schema) > self.schema_depth:
            raise InvalidParameter(param, f"invalid {param}: the schema nests deeper than {self.schema_depth}")

    def check_work(self, prompt_lens: list[int], params: SamplingParams) -> None:
        """The request's total work: each prompt's n sequences, each up to prompt + max_tokens tokens."""
        work = sum(params.n * (n + params.max_tokens) for n in prompt_lens)
        if work > self.request_tokens:
            raise InvalidParameter(
                "max_tokens",
                f"the request asks for {work} tokens of work (prompts x n x (prompt + max_tokens)), at most "
                f"{self.request_tokens} (server.limits.request_tokens): lower n or max_tokens",
            )


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a hostile value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest
