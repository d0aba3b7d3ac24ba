"""Hostile requests (issue #32): each bounded at the HTTP edge before it is tokenized or queued, a fast 4xx
naming the parameter, the server healthy and answering an ordinary request right after; the same bounds in
the offline API; one client cannot starve another; SIGTERM ends the server even with the engine's pipe full."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import httpx
import pytest
import torch
from conftest import PROMPTS
from live_server import MODEL, descendants, running_server, start_server, wait_gone, wait_ready

from engine import LLM, SamplingParams
from engine.limits import RequestLimits
from engine.openapi import openapi_document
from engine.sampling_params import RANGES

FAST_S = 5.0  # a refusal is the parser's and a check's work, never a generation's


def nested_schema(levels: int) -> dict:
    """An array schema `levels` deep: under the body's nesting limit, over a schema's."""
    schema: dict = {"type": "array"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


HOSTILE = {
    "n=100000": ({"prompt": "hi", "n": 100000}, 400, "n"),
    "logit_bias of 200,000 entries": (
        {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(200000)}}, 400, "logit_bias"
    ),
    "10,000 stop strings": ({"prompt": "hi", "stop": [f"s{i}" for i in range(10000)]}, 400, "stop"),
    "a stop string of 10,000 characters": ({"prompt": "hi", "stop": "x" * 10000}, 400, "stop"),
    "logit_bias token id past the vocabulary": ({"prompt": "hi", "logit_bias": {"999999999": 5}}, 400, "logit_bias"),
    "logit_bias value of 1000": ({"prompt": "hi", "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    "best_of above n": ({"prompt": "hi", "best_of": 5}, 400, "best_of"),
    "3,000 messages": ({"messages": [{"role": "user", "content": "hi"}] * 3000}, 400, "messages"),
    "200 tools": (
        {"messages": [{"role": "user", "content": "hi"}],
         "tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
                   for i in range(200)]},
        400, "tools",
    ),
    "a schema nested 40 deep": (
        {"messages": [{"role": "user", "content": "hi"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested_schema(40)}}},
        400, "response_format",
    ),
    "a request's work over the limit": ({"prompt": "hi", "n": 16, "max_tokens": 20000}, 400, "max_tokens"),
}  # fmt: skip


def assert_refused(url: str, content: bytes | str, status: int, param: str | None) -> None:
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions" if b'"messages"' not in _bytes(content) else f"{url}/v1/chat/completions",
                   content=content, headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    took = time.perf_counter() - start
    assert r.status_code == status, r.text[:300]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert took < FAST_S, f"refused after {took:.1f} s"


def _bytes(content: bytes | str) -> bytes:
    return content if isinstance(content, bytes) else content.encode()


def assert_healthy(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    with running_server(tiny_qwen3, tmp_path_factory.mktemp("hostile")) as url:
        yield url


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_request_is_refused_at_once_and_the_server_stays_healthy(server, name):
    body, status, param = HOSTILE[name]
    assert_refused(server, json.dumps(body), status, param)
    assert_healthy(server)


def test_a_deeply_nested_body_is_a_400_not_a_500(server):
    assert_refused(server, "[" * 100000, 400, None)
    assert_refused(server, json.dumps({"prompt": "hi", "x": json.loads("[" * 70 + "]" * 70)}), 400, None)
    assert_healthy(server)


def test_an_oversized_body_is_a_413(server):
    limit = RequestLimits().body_bytes
    assert_refused(server, json.dumps({"prompt": "x" * (limit + 10)}), 413, None)
    assert_healthy(server)


def test_the_advertised_bounds_are_the_enforced_ones(server):
    """/openapi.json's numeric bounds and list limits come from the table SamplingParams checks and from the
    server's limits: a value at each advertised bound is accepted, one past it refused."""
    doc = httpx.get(f"{server}/openapi.json").json()
    assert doc == openapi_document(MODEL, doc_vocab(doc), RequestLimits())
    fields = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    for name, (_, low, high, exclusive) in RANGES.items():
        schema = fields.get(name, fields.get("max_tokens") if name == "max_tokens" else None)
        if schema is None:
            continue
        bounds = schema["anyOf"][0]
        assert bounds.get("maximum") == (RequestLimits().n if name == "n" else high), name
        assert bounds.get("exclusiveMinimum" if exclusive else "minimum") == low, name
        if high is not None and name != "n":
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: high + 1})
            SamplingParams(**{name: high})
    assert fields["n"]["anyOf"][0]["maximum"] == RequestLimits().n
    assert fields["stop"]["anyOf"][0]["anyOf"][1]["maxItems"] == RequestLimits().stop
    assert fields["logit_bias"]["anyOf"][0]["maxProperties"] == RequestLimits().logit_bias
    for past in ({"n": RequestLimits().n + 1}, {"stop": ["a"] * (RequestLimits().stop + 1)}):
        assert_refused(server, json.dumps({"prompt": "hi", **past}), 400, next(iter(past)))


def doc_vocab(doc: dict) -> int:
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    return prompt[2]["items"]["maximum"] + 1


def test_per_client_limit_answers_429_and_health_stays_up(tiny_qwen3, tmp_path):
    with running_server(tiny_qwen3, tmp_path, "server.limits.per_client=1") as url:
        body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        started = threading.Event()

        def long_stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    started.set()

        thread = threading.Thread(target=long_stream, daemon=True)
        thread.start()
        assert started.wait(60)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.get(f"{url}/health").status_code == 200
        assert "engine_requests_running" in httpx.get(f"{url}/metrics").text
        thread.join(120)
        assert_healthy(url)  # the slot came back when the stream ended


def test_offline_requests_get_the_same_bounds(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False)
    with pytest.raises(ValueError, match="invalid n=40"):
        llm.generate(["hi"], SamplingParams(n=40))
    with pytest.raises(ValueError, match="invalid stop"):
        llm.generate(["hi"], SamplingParams(stop=[f"s{i}" for i in range(5)]))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(["hi"], SamplingParams(logit_bias={999_999_999: 1.0}))
    # logit_bias steers greedy decoding: +100 on one token makes it every output token.
    out = llm.generate_outputs(["hi"], SamplingParams(max_tokens=4, temperature=0, logit_bias={"42": 100}))
    assert out[0].outputs[0].token_ids == [42] * 4
    stats = llm.engine.stats()
    assert stats["kv_pages_free"] + stats["kv_pages_evictable"] == stats["kv_pages_total"]


def test_a_big_request_does_not_starve_a_short_one(tiny_qwen3, tmp_path):
    """One client's n=16 long generation, then another client's one-token request: its time to first token
    stays within a small multiple of the same request's on an idle server."""
    with running_server(tiny_qwen3, tmp_path) as url:
        short = {"prompt": PROMPTS[1], "max_tokens": 1, "temperature": 0}

        def ttft() -> float:
            start = time.perf_counter()
            assert httpx.post(f"{url}/v1/completions", json=short, timeout=120).status_code == 200
            return time.perf_counter() - start

        ttft()  # warm
        idle = min(ttft() for _ in range(3))
        big = {"prompt": PROMPTS[3], "n": 16, "max_tokens": 300, "ignore_eos": True, "temperature": 1}
        thread = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=big, timeout=300))
        thread.start()
        time.sleep(1.0)  # the big request is decoding
        busy = ttft()
        thread.join(300)
    # 16 decode rows share each step with the short request's prefill: a few times the idle step, not the
    # big request's whole generation (300 steps).
    assert busy < 10 * idle + 0.5, f"short request waited {busy:.2f} s under load vs {idle:.2f} s idle"


def test_sigterm_ends_the_server_with_large_requests_queued_for_a_stuck_engine(tiny_qwen3, tmp_path):
    """The engine stops reading (SIGSTOP) while requests larger than the pipe's buffer are queued for it; the
    server must still exit on SIGTERM instead of joining the queue's feeder thread forever."""
    proc, url = start_server(tiny_qwen3, tmp_path)
    wait_ready(proc, url)
    family = descendants(proc.pid)
    engine_pid = httpx.get(f"{url}/health").json()["engine_pid"]
    os.kill(engine_pid, signal.SIGSTOP)
    try:
        prompt = list(range(1000, 1400))
        for _ in range(12):  # 12 x 16 sequences x 400 token ids: well over a pipe's 64 KiB
            threading.Thread(
                target=lambda: httpx.post(
                    f"{url}/v1/completions", json={"prompt": prompt, "n": 16, "max_tokens": 4}, timeout=30
                ),  # fmt: skip
                daemon=True,
            ).start()
        time.sleep(2)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert time.time() - start < 15, f"exited after {time.time() - start:.1f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine_pid, signal.SIGCONT)
    assert not wait_gone(family, 10), "processes left behind"
