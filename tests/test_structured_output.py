"""Constrained decoding (JSON schema, regex, grammar) and tool calling, on a tiny random model (whose free
output is noise, so only the constraint can make it valid) and on the real SmolLM2."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from conftest import PROMPTS
from live_server import MODEL, running_server, wait_idle
from pydantic import BaseModel, Field

from engine import LLM, SamplingParams
from engine.structured import grammar_of
from engine.tool_calls import ToolRequest, ToolStream, extract_calls

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False)


def replay(llm: LLM, params: SamplingParams, token_ids: list[int]) -> bool:
    """Every sampled token was allowed by the grammar at its step, and the grammar is complete at the end."""
    import llguidance.hf

    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(llm.tokenizer, n_vocab=151936), grammar_of(params))
    eos = llm.engine.eos_token_ids
    body = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
    return all(matcher.consume_token(t) for t in body) and matcher.is_accepting()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_always_validates(llm, temperature):
    params = [SamplingParams(max_tokens=80, temperature=temperature, seed=i, json_schema=PERSON) for i in range(6)]
    outs = llm.generate_outputs(PROMPTS[:6], params)
    for o, p in zip(outs, params):
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text  # ended because the object closed, well before max_tokens
        jsonschema.validate(json.loads(c.text), PERSON)
        assert replay(llm, p, c.token_ids)


def test_regex_and_grammar_match_in_full_and_end_only_when_complete(llm):
    regex = SamplingParams(max_tokens=40, temperature=1.0, seed=3, regex=r"[a-c]{4}-[0-9]{2}")
    lark = SamplingParams(max_tokens=40, temperature=1.0, seed=4, grammar='start: "yes" | "no" | "maybe"')
    r, g = llm.generate_outputs(["x", "y"], [regex, lark])
    assert re.fullmatch(r"[a-c]{4}-[0-9]{2}", r.outputs[0].text) and r.outputs[0].finish_reason == "stop"
    assert g.outputs[0].text in ("yes", "no", "maybe") and g.outputs[0].finish_reason == "stop"


def test_constrained_and_free_requests_share_batches(llm):
    free = SamplingParams(max_tokens=10, temperature=0)
    alone = llm.generate_outputs(PROMPTS[:4], free)
    mixed = llm.generate_outputs(
        PROMPTS[:4] + PROMPTS[:4], [free] * 4 + [SamplingParams(max_tokens=80, json_schema=PERSON, seed=9)] * 4
    )
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]
    for o in mixed[4:]:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


def test_preemption_and_prefix_cache_keep_the_constraint(tiny_qwen3):
    # 31 pages of 4 tokens: eight constrained sequences cannot all hold their KV, so some are preempted
    # and recomputed mid-object; the same prompt twice also hits the prefix cache.
    llm = LLM(str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False, page_size=4,
              num_pages=32, max_num_batched_tokens=64)  # fmt: skip
    params = SamplingParams(max_tokens=60, temperature=1.0, json_schema=PERSON)
    outs = llm.generate_outputs([PROMPTS[3]] * 8, [dataclasses.replace(params, seed=i) for i in range(8)])
    assert llm.engine.stats()["preemptions"] > 0
    assert sum(o.usage.cached_tokens for o in outs) > 0
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
    s = llm.engine.stats()
    assert s["kv_pages_free"] + s["kv_pages_evictable"] == s["kv_pages_total"]


def test_bad_constraints_name_the_field():
    with pytest.raises(ValueError, match="invalid json_schema"):
        SamplingParams(json_schema={"type": "nonsense"})
    with pytest.raises(ValueError, match="invalid json_schema: not JSON"):
        SamplingParams(json_schema="{nope")
    with pytest.raises(ValueError, match="invalid regex"):
        SamplingParams(regex="(unclosed")
    with pytest.raises(ValueError, match="only one of"):
        SamplingParams(regex="a", grammar='start: "a"')
    assert SamplingParams(json_schema='{"type": "object"}').json_schema == {"type": "object"}


def test_tool_call_parsing_and_streaming_hold_back():
    auto = ToolRequest([WEATHER], "auto")
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
    content, calls = extract_calls(text, auto)
    assert content == "Let me check." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"}
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert extract_calls("no call here", auto) == ("no call here", [])
    assert extract_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', auto)[1] == []  # unknown tool
    stream = ToolStream(auto)
    sent = "".join(stream.feed(piece) for piece in ["Let me ", "check.<tool", '_call>\n{"name"', ": 1}"])
    assert sent == "Let me check."  # nothing of the call leaked as content
    assert ToolStream(auto).feed("a <tool") == "a "  # a possible start is held back


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    with running_server(tiny_qwen3, tmp_path_factory.mktemp("structured")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_response_format_through_the_sdk(client, server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], response_format=fmt,
                                       temperature=1.0, max_tokens=100)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y"}],
                                            response_format=fmt, max_tokens=100, stream=True)  # fmt: skip
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), PERSON)
    r = client.completions.create(model=MODEL, prompt="z", max_tokens=100, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=60,
                                       response_format={"type": "json_object"}, seed=2)  # fmt: skip
    # Any object: the noise model may still be inside a string at max_tokens ("length"); if it closed, it parses.
    text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict))

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=99)

    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                           response_format=Person, max_tokens=60)  # fmt: skip
    assert isinstance(parsed.choices[0].message.parsed, Person)
    wait_idle(server)


def test_forced_tool_calls_through_the_sdk_streaming_and_not(client):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=80, temperature=1.0)  # fmt: skip
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                                 tool_choice="required", max_tokens=80, stream=True))  # fmt: skip
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks), "a forced call is not content"

    # The call and its result go back in the next turn.
    follow_up = messages + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": deltas[0].id, "type": "function",
         "function": {"name": "get_weather", "arguments": deltas[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": '{"temperature": 4}'},
    ]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER], max_tokens=8)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"guided_regex": "(unclosed"}, "regex"),
    ],
)  # fmt: skip
def test_bad_structured_requests_are_400_naming_the_parameter(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body=extra)  # fmt: skip
    assert e.value.body["param"] == param, e.value.body
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=2).choices[0].text is not None
    wait_idle(server)


# Nested objects, arrays with min/max items, enums, bounded numbers, required and optional fields, patterns.
# Objects are closed (additionalProperties: false): left open, SmolLM2 at temperature 0 kept adding
# properties (copies of the schema) until max_tokens, which such a schema allows.
SCHEMAS = json.loads((Path(__file__).parent.parent / "experiments" / "schemas.json").read_text())


@pytest.mark.slow
def test_smollm2_calls_a_tool_through_the_sdk(tmp_path):
    with running_server(None, tmp_path) as url:  # the embedded SmolLM2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=60, temperature=0)  # fmt: skip
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        stream = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=60,
                                                tool_choice="required", temperature=0, stream=True)  # fmt: skip
        deltas = [d for c in stream for d in (c.choices[0].delta.tool_calls or [])]
        assert [d.function.arguments for d in deltas] == [call.function.arguments]  # greedy: the same call


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_smollm2_answers_validate_against_every_schema(temperature):
    llm = LLM(dtype=torch.float32, enforce_eager=True, progress_bar=False)  # the embedded SmolLM2
    conversations = [[{"role": "user", "content": f"Answer in JSON following this schema: {json.dumps(s)}"}]
                     for s in SCHEMAS]  # fmt: skip
    params = [SamplingParams(max_tokens=200, temperature=temperature, seed=i, json_schema=s)
              for i, s in enumerate(SCHEMAS)]  # fmt: skip
    outs = llm.chat_outputs(conversations, params)
    for schema, o in zip(SCHEMAS, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
