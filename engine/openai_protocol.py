"""OpenAI request parsing and response shapes (chat.completion, text_completion, their SSE chunks, errors).

Pure functions of request bodies and finished or streamed choices: the HTTP handlers in server.py
decide when to send what, this module decides what it looks like on the wire."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import APIError
from engine.limits import RequestLimits
from engine.outputs import TokenLogprob, Usage
from engine.sampling_params import InvalidParameter, SamplingParams, check_request
from engine.tokenizer import encode_chat
from engine.tool_calls import ToolRequest, parse_tool_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _expect(body: dict[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if int in types and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON has one number type: 4.0 is the integer 4 (as JSON Schema and pydantic say)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise APIError(400, f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


# Request fields copied into SamplingParams when present, with the JSON types they may have.
_NUMBER = (int, float)
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "top_k": ((int,), "an integer"),
    "min_p": (_NUMBER, "a number"),
    "n": ((int,), "an integer"),
    "presence_penalty": (_NUMBER, "a number"),
    "frequency_penalty": (_NUMBER, "a number"),
    "repetition_penalty": (_NUMBER, "a number"),
    "ignore_eos": ((bool,), "a boolean"),
    "seed": ((int,), "an integer"),
    "stop_token_ids": ((list,), "a list of token ids"),
    "skip_special_tokens": ((bool,), "a boolean"),
    "include_stop_str_in_output": ((bool,), "a boolean"),
    "priority": ((int,), "an integer"),
    "logit_bias": ((dict,), "an object mapping token ids to numbers"),
}


Prompt = tuple[str | None, list[int]]  # (the text, if the client sent text; its token ids)


@dataclass
class ParsedRequest:
    """One OpenAI request body, parsed and checked once: what the route submits and how it answers."""

    chat: bool
    prompts: list[Prompt]
    params: SamplingParams
    tools: ToolRequest | None
    stream: bool
    include_usage: bool


def parse_request(
    body: dict[str, Any],
    chat: bool,
    tokenizer: PreTrainedTokenizerBase,
    limits: RequestLimits,
    vocab_size: int,
    max_model_len: int,
) -> ParsedRequest:
    """The body (already JSON and under the body limits) as one typed request: every bound that needs no
    tokenizer is checked before tokenizing; then the prompts are encoded and checked against the engine's
    shape. APIError (400, naming the parameter) for anything wrong."""
    try:
        limits.check_body(body)
        tools = parse_tool_request(body) if chat else None
        forced = {"json_schema": tools.call_schema()} if tools is not None and tools.forced else {}
        params = sampling_params(body, chat, forced)
        limits.check_params(params)
        prompts = _encode(body, chat, tokenizer, tools)
        if chat and not max_tokens_given(body, chat):  # the rest of the context, as OpenAI's and vLLM's do
            params = dataclasses.replace(params, max_tokens=max(1, max_model_len - len(prompts[0][1])))
        for _, ids in prompts:
            check_request(ids, params, vocab_size, max_model_len)
        limits.check_work([len(ids) for _, ids in prompts], params)
    except InvalidParameter as e:
        raise APIError(400, str(e), param="messages" if chat and e.param == "prompt" else e.param) from None
    return ParsedRequest(chat, prompts, params, tools, bool(body.get("stream")), stream_options(body))


def _encode(
    body: dict[str, Any], chat: bool, tokenizer: PreTrainedTokenizerBase, tools: ToolRequest | None
) -> list[Prompt]:
    if not chat:
        return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, p) for p in completion_prompts(body)]
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    try:
        return [(None, encode_chat(tokenizer, chat_messages(body), kwargs, tools.tools if tools else None))]
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # a template error on an odd conversation is the request's fault, not the server's
        raise APIError(
            400, f"the chat template failed on these messages: {type(e).__name__}: {e}", param="messages"
        ) from None


def sampling_params(
    body: dict[str, Any], chat: bool, constraint_override: dict[str, Any] | None = None
) -> SamplingParams:
    """SamplingParams from the body's fields; `constraint_override` replaces the body's constraint (a forced
    tool call's schema)."""
    kwargs: dict[str, Any] = {}
    for name, (types, what) in _FIELDS.items():
        value = _expect(body, name, types, what)
        if value is not None:
            kwargs[name] = value
    max_tokens = _expect(body, "max_completion_tokens", (int,), "an integer") if chat else None
    if max_tokens is None:
        max_tokens = _expect(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
        kwargs["stop"] = stop
    if chat:
        if _expect(body, "logprobs", (bool,), "a boolean"):
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = _expect(body, "top_logprobs", (int,), "an integer") or 0
        elif body.get("top_logprobs"):
            raise APIError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    else:
        k = _expect(body, "logprobs", (int,), "an integer")
        if k is not None:
            if not 0 <= k <= 5:
                raise APIError(400, f"'logprobs' must be in [0, 5], got {k}", param="logprobs")
            kwargs["logprobs"], kwargs["top_logprobs"] = True, k
    best_of = _expect(body, "best_of", (int,), "an integer")
    if best_of is not None and best_of != kwargs.get("n", 1):
        raise APIError(400, f"'best_of' must equal n (other values are not supported), got {best_of}", param="best_of")
    kwargs.update(constraint_override or constraint(body))
    try:
        return SamplingParams(**kwargs)
    except InvalidParameter as e:
        param = "response_format" if e.param == "json_schema" and "response_format" in body else e.param
        raise APIError(400, str(e), param=param) from None


# vLLM's names for constraints outside response_format
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar"}


def constraint(body: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams' constraint from OpenAI's `response_format` (or vLLM's guided_json/regex/grammar)."""
    out = {field: body[name] for name, field in _GUIDED.items() if body.get(name) is not None}
    fmt = body.get("response_format")
    if fmt is None:
        return out
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise APIError(400, "'response_format' must be an object with a 'type'", param="response_format")
    if fmt["type"] == "text":
        return out
    if fmt["type"] == "json_object":
        return {**out, "json_schema": {"type": "object"}}
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(
                400, "'response_format.json_schema' must be an object with a 'name'", param="response_format"
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise APIError(
                400, "'response_format.json_schema.schema' must be a JSON schema object", param="response_format"
            )
        return {**out, "json_schema": schema}
    raise APIError(
        400,
        f"unknown response_format.type {fmt['type']!r}: expected text, json_object or json_schema",
        param="response_format",
    )


def stream_options(body: dict[str, Any]) -> bool:
    """Whether the stream ends with a usage chunk."""
    opts = _expect(body, "stream_options", (dict,), "an object") or {}
    return bool(opts.get("include_usage"))


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        elif content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({**m, "content": content})
    return out


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")


# ---------------------------------------------------------------------------------------- responses


@dataclass
class ResponseHeader:
    id: str
    created: int
    model: str
    system_fingerprint: str  # names the serving configuration, as OpenAI's does its backend

    @classmethod
    def new(cls, prefix: str, model: str, system_fingerprint: str) -> ResponseHeader:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model, system_fingerprint)

    def wrap(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
            **extra,
        }


def max_tokens_given(body: dict[str, Any], chat: bool) -> bool:
    """Whether the request sets its own limit (chat without one may use the rest of the context, as OpenAI's
    and vLLM's do; a legacy completion gets SamplingParams' 16, as OpenAI's legacy API does)."""
    return body.get("max_tokens") is not None or (chat and body.get("max_completion_tokens") is not None)


SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload`."""
    return f"data: {json.dumps(payload)}\n\n"


def object_name(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def role_choice(index: int) -> dict[str, Any]:
    """The first chunk of a streamed chat choice: the assistant role, no content yet."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def delta_choice(
    index: int, chat: bool, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None
) -> dict[str, Any]:
    """A streamed piece of a choice."""
    body = {"delta": {"content": text} if text else {}} if chat else {"text": text}
    return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}


def final_choice(
    index: int,
    chat: bool,
    text: str | None,
    logprobs: dict[str, Any] | None,
    finish_reason: str | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole choice of a non-streamed response (with tool calls: content may be None)."""
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_calls_choice(index: int, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed delta carrying whole tool calls (each with its position in the message)."""
    calls = [{"index": k, **call} for k, call in enumerate(tool_calls)]
    return {"index": index, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}


def choice_logprobs(
    tokenizer: PreTrainedTokenizerBase, chat: bool, token_ids: list[int], logprobs: list[TokenLogprob]
) -> dict[str, Any]:
    return (chat_logprobs if chat else completion_logprobs)(tokenizer, token_ids, logprobs)


def total_usage(usages: list[Usage]) -> Usage:
    return Usage(*(sum(getattr(u, f.name) for u in usages) for f in dataclasses.fields(Usage)))


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        # OpenAI's fields for predicted outputs; here the speculative drafts' tokens
        "completion_tokens_details": {
            "accepted_prediction_tokens": usage.accepted_prediction_tokens,
            "rejected_prediction_tokens": usage.rejected_prediction_tokens,
        },
    }


def _piece(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], logprobs: list[TokenLogprob]
) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = _piece(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
            for t, (lp, top) in zip(token_ids, logprobs)
        ]
    }


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], logprobs: list[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    tokens = [_piece(tokenizer, t) for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in logprobs],
        "top_logprobs": [{_piece(tokenizer, a): alp for a, alp in top} for _, top in logprobs],
        "text_offset": offsets,
    }
