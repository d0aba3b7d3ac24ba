"""The OpenAPI document of the server (`GET /openapi.json`): OpenAI's request bodies for the routes served,
with the engine's extensions (vLLM's names) and the limits it enforces, and OpenAI's error body."""

from __future__ import annotations

from typing import Any

from engine.limits import RequestLimits
from engine.sampling_params import LOGIT_BIAS_RANGE, RANGES

_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _ranged(name: str) -> dict[str, Any]:
    """A numeric field as SamplingParams checks it (sampling_params.RANGES)."""
    kind, low, high, exclusive = RANGES[name]
    schema: dict[str, Any] = {"type": kind}
    if low is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = low
    if high is not None:
        schema["maximum"] = high
    return schema


def _sampling(limits: RequestLimits) -> dict[str, Any]:
    """Both routes' sampling fields, OpenAI's then the engine's (vLLM's), with the bounds that are enforced:
    SamplingParams' ranges and the server's limits."""
    stop = {**_STR, "minLength": 1, "maxLength": limits.stop_length}
    low, high = LOGIT_BIAS_RANGE
    return {
        **{name: _nullable(_ranged(name)) for name in RANGES if name not in ("top_logprobs", "priority")},
        "n": _nullable({**_ranged("n"), "maximum": limits.n}),
        "best_of": _nullable({**_INT, "description": "must equal n"}),
        "stop": _nullable({"anyOf": [stop, {"type": "array", "items": stop, "maxItems": limits.stop}]}),
        "logit_bias": _nullable(
            {
                "type": "object",
                "maxProperties": limits.logit_bias,
                "propertyNames": {"pattern": "^[0-9]{1,11}$"},
                "additionalProperties": {"type": "number", "minimum": low, "maximum": high},
            }
        ),
        "stream": _nullable(_BOOL),
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": _BOOL}}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}),
        "user": _STR,
        "ignore_eos": _nullable(_BOOL),
        "stop_token_ids": _nullable({"type": "array", "items": {"type": "integer", "minimum": 0}}),
        "skip_special_tokens": _nullable(_BOOL),
        "include_stop_str_in_output": _nullable(_BOOL),
        "priority": _nullable({**_ranged("priority"), "description": "scheduler=priority admits lower values first"}),
    }


_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": _STR},
    "required": ["type", "text"],
}
_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [_STR, {"type": "array", "items": _TEXT_PART}]},
        "name": _STR,
    },
    "required": ["role", "content"],
}


def _chat_request(limits: RequestLimits) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": limits.messages},
            **_sampling(limits),
            "max_completion_tokens": _nullable(_ranged("max_tokens")),
            "logprobs": _nullable(_BOOL),
            "top_logprobs": _nullable(_ranged("top_logprobs")),
            "chat_template_kwargs": _nullable({"type": "object", "description": "passed to the chat template"}),
            "tools": _nullable({"type": "array", "items": {"type": "object"}, "maxItems": limits.tools}),
        },
        "required": ["messages"],
    }


def _completion_request(vocab_size: int, limits: RequestLimits) -> dict[str, Any]:
    tokens = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    return {
        "type": "object",
        "properties": {
            "prompt": {
                "anyOf": [
                    text,
                    {"type": "array", "items": text, "minItems": 1},
                    tokens,
                    {"type": "array", "items": tokens, "minItems": 1},
                ]
            },
            **_sampling(limits),
            "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 5}),
        },
        "required": ["prompt"],
    }


ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": _STR,
                "type": _STR,
                "param": _nullable(_STR),
                "code": _nullable(_STR),
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}


def _error_responses(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "invalid request",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body over server.limits.body_bytes",
        429: "over server.limits.per_client requests in flight (Retry-After says when to retry)",
        500: "engine failure",
        503: "engine not running or shutting down",
    }
    return {
        str(c): {
            "description": reasons[c],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for c in codes
    }


def _generation_route(summary: str, body_schema: str, response_object: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body_schema}"}}},
            },
            "responses": {
                "200": {
                    "description": f"a {response_object} object, or with stream: true server-sent chunks",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                },
                **_error_responses(400, 401, 404, 413, 429, 500, 503),
            },
        }
    }


def openapi_document(model: str, vocab_size: int, limits: RequestLimits) -> dict[str, Any]:
    """The document for a server serving `model` (the only value `model` may take in a request), whose
    token ids are below `vocab_size`, under these request limits."""
    model_field = {"model": {"type": "string", "enum": [model], "description": "the served model's id"}}
    chat = _chat_request(limits)
    chat["properties"] = {**model_field, **chat["properties"]}
    completion = _completion_request(vocab_size, limits)
    completion["properties"] = {**model_field, **completion["properties"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "torch-inference-engine", "version": "0.1.0", "description": "OpenAI-compatible API"},
        "paths": {
            "/v1/chat/completions": _generation_route("Chat completion", "ChatCompletionRequest", "chat.completion"),
            "/v1/completions": _generation_route("Text completion", "CompletionRequest", "text_completion"),
            "/v1/models": {
                "get": {
                    "summary": "The served model",
                    "responses": {"200": {"description": "a list with one model"}, **_error_responses(401)},
                }
            },
            "/health": {
                "get": {
                    "summary": "Engine liveness",
                    "responses": {"200": {"description": "ok"}, "503": {"description": "the engine is gone"}},
                }
            },
        },
        "components": {
            "schemas": {"ChatCompletionRequest": chat, "CompletionRequest": completion, "Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
