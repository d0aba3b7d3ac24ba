"""The OpenAI-compatible server, started for real (`python server.py ...` on a free port) and driven
with the official openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from conftest import PROMPTS
from live_server import MODEL, ROOT, metric, running_server, start_server, stop, wait_idle, wait_ready

from engine import LLM


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    with running_server(tiny_qwen3, tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completions_equal_llm_generate(client, llm):
    expected = llm.generate(PROMPTS[:3], max_tokens=8, temperature=0)
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert resp.object == "text_completion"
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == expected
    assert all(c.finish_reason == "length" for c in resp.choices)
    prompt_tokens = sum(len(llm.tokenizer.encode(p)) for p in PROMPTS[:3])
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, 24)
    ids = llm.tokenizer.encode(PROMPTS[4])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == llm.generate([ids], max_tokens=8, temperature=0)[0]


def test_chat_equals_llm_chat_stream_and_not(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    (expected,) = llm.chat_outputs(messages, max_tokens=10, temperature=0)
    assert llm.chat(messages, max_tokens=10, temperature=0) == [expected.outputs[0].text]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected.outputs[0].text
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_async_non_stream_and_chat_template_kwargs(server, llm):
    messages = [{"role": "user", "content": "Hi"}]
    (expected,) = llm.chat_outputs(
        messages, max_tokens=5, temperature=0, chat_template_kwargs={"enable_thinking": False}
    )

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused") as aclient:
            return await aclient.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=5,
                temperature=0,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}},
            )

    resp = asyncio.run(main())
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.choices[0].message.content == expected.outputs[0].text


def test_content_parts_n_stop_and_logprobs(client, llm):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=4,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].message.content == resp.choices[1].message.content  # greedy twice
    content = resp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert abs(content[0].top_logprobs[0].logprob - content[0].logprob) < 1e-5  # greedy picks the top
    full = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=10, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=10, temperature=0, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    seeded = [
        client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=3.0, seed=7, extra_body={"top_k": 50}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_async_client_32_concurrent_streams(server, llm):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(32)]
    expected = llm.generate(prompts, max_tokens=12, temperature=0)
    aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")

    async def one(prompt):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        pieces, reasons = [], []
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(pieces), [r for r in reasons if r]

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert [text for text, _ in results] == expected
    assert all(reasons == ["length"] for _, reasons in results)
    wait_idle(server)


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_chat_error_matrix(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_completion_errors_unknown_route_and_extra_fields(server):
    for body, param in [
        ({"model": MODEL}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": [10**9]}, "prompt"),
    ]:
        r = httpx.post(f"{server}/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.get(f"{server}/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2, "user": "u", "whatever": [1]})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(server, client):
    """OpenAI and vLLM do not cut chat at 16 tokens; the legacy completions API keeps 16 (as OpenAI's does)."""
    messages = [{"role": "user", "content": "Tell me a long story."}]
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    max_model_len = httpx.get(f"{server}/v1/models").json()["data"][0]["max_model_len"]
    assert resp.usage.completion_tokens == max_model_len - resp.usage.prompt_tokens > 16
    assert resp.choices[0].finish_reason == "length"
    legacy = client.completions.create(model=MODEL, prompt="Once", temperature=0, extra_body={"ignore_eos": True})
    assert legacy.usage.completion_tokens == 16


def test_a_prompt_longer_than_the_context_is_named_as_such(server):
    long_text = "word " * 2000  # > the tiny model's 1024 positions
    for route, body, param in [
        ("completions", {"prompt": long_text}, "prompt"),
        ("chat/completions", {"messages": [{"role": "user", "content": long_text}]}, "messages"),
    ]:
        r = httpx.post(f"{server}/v1/{route}", json={"model": MODEL, **body})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, r.text
        assert "prompt is too long" in err["message"] and "maximum context length is 1024" in err["message"]
        assert "max_tokens" not in err["message"]


def test_chunks_carry_usage_null_and_a_stable_fingerprint(server, client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 4
    raw = httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True,
              "stream_options": {"include_usage": True}},
    ).text  # fmt: skip
    payloads = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert all("usage" in p for p in payloads), "every chunk names usage (null until the last) when asked for it"
    fingerprints = {c.system_fingerprint for c in chunks} | {p["system_fingerprint"] for p in payloads}
    plain = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert len(fingerprints | {plain.system_fingerprint}) == 1 and plain.system_fingerprint.startswith("fp_")
    created = {httpx.get(f"{server}/v1/models").json()["data"][0]["created"] for _ in range(2)}
    time.sleep(1.1)
    created.add(httpx.get(f"{server}/v1/models").json()["data"][0]["created"])
    assert len(created) == 1


def test_client_disconnect_aborts_and_frees_kv(server):
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{server}/v1/completions",
            json={"prompt": PROMPTS[3], "max_tokens": 900, "stream": True, "ignore_eos": True},
        ) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        # leaving the block closes the connection mid-stream
    wait_idle(server)
    assert metric(server, "engine_generation_tokens_total") > 0
    assert metric(server, "engine_decode_compiled") == 0  # this server runs with compile.enabled=false


def test_api_key_and_engine_death(tiny_qwen3, tmp_path):
    proc, url = start_server(tiny_qwen3, tmp_path, "server.api_key=sekrit")
    try:
        wait_ready(proc, url)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        bad = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit")
        assert good.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()

        engine_pid = httpx.get(f"{url}/health").json()["engine_pid"]
        stream = good.completions.create(
            model=MODEL, prompt="Hello", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        os.kill(engine_pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:  # the stream must end with an error, not hang
                pass
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 503
        after = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert after.status_code == 503 and after.json()["error"]["type"] == "server_error"
    finally:
        stop(proc)


def test_startup_failures_exit_with_a_message(tiny_qwen3, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc, _ = start_server(tiny_qwen3, tmp_path, port=taken.getsockname()[1])
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "cannot listen on 127.0.0.1" in out
    proc, _ = start_server(tmp_path / "missing-model", tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "missing-model" in out and "Traceback" not in out
    assert "model.path=" in out and "never downloads" in out


def test_internal_error_is_a_500_with_a_message(qwen_tokenizer):
    """An unexpected failure inside the server answers 500 with OpenAI's error body, not a traceback."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    sys.path.insert(0, str(ROOT))
    import server as srv
    from engine.config import compose_config

    class BrokenEngine:
        alive, dead_reason = True, None
        info = SimpleNamespace(vocab_size=151936, max_model_len=1024, pid=0)

        def add(self, *args):
            raise RuntimeError("engine queue exploded")

        def abort(self, *args):
            pass

        def relay(self, *args):
            pass

    state = srv.Server(compose_config(served_model_name=MODEL), qwen_tokenizer, BrokenEngine())
    with TestClient(srv.create_app(state), raise_server_exceptions=False) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500
    assert "engine queue exploded" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    assert not state.frontend.live  # nothing left tracked


def test_server_module_imports_neither_torch_nor_transformers():
    """The engine process re-imports server.py when it is spawned, and the HTTP process spawns it before
    loading the tokenizer: both stay off the start-up's critical path only while this import is light."""
    code = "import sys, server; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
