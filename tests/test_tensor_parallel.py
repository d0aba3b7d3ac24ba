"""Tensor parallelism over gloo on CPU: token-identical to one rank, through the API and the server."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
import torch
from conftest import PROMPTS
from test_server import MODEL, start_server, stop, wait_ready

from engine import LLM

# quant=none: under tensor parallelism `auto` loads float weights, so the one-rank reference must too.
KW = dict(dtype=torch.float32, enforce_eager=True, progress_bar=False, quant="none")


def greedy_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate_outputs(prompts, max_tokens=10, temperature=0)]


def test_tp2_tiny_qwen3_matches_one_rank(tiny_qwen3):
    single = LLM(str(tiny_qwen3), **KW)
    prompts = [single.encode(p) for p in PROMPTS]
    expected = greedy_ids(single, prompts)
    with LLM(str(tiny_qwen3), **KW, **{"parallel.tp": 2}) as llm:
        assert len(llm.engine.workers) == 1 and llm.engine.workers[0].is_alive()
        assert llm.engine.model.layers[0].self_attn.num_heads == 2  # 4 heads split over 2 ranks
        assert greedy_ids(llm, prompts) == expected
        # chunked prefill, prefix hits and prompt logprobs go through the same broadcast plan
        outs = llm.generate_outputs(prompts[:2], max_tokens=3, temperature=0, prompt_logprobs=1)
        ref = single.generate_outputs(prompts[:2], max_tokens=3, temperature=0, prompt_logprobs=1)
        for a, b in zip(outs, ref):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert all(abs(x[0] - y[0]) < 1e-4 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))
        worker = llm.engine.workers[0]
    worker.join(timeout=10)
    assert not worker.is_alive(), "shutdown must stop the other ranks"


@pytest.mark.slow
def test_tp3_smollm2_matches_one_rank_in_api_and_server(tmp_path):
    single = LLM(**KW)
    prompts = [single.encode(p) for p in PROMPTS]
    expected = greedy_ids(single, prompts)
    texts = single.generate(PROMPTS[:4], max_tokens=10, temperature=0)
    del single
    with LLM(**KW, **{"parallel.tp": 3}) as llm:  # 9 heads, 3 KV heads: one KV head per rank
        assert llm.engine.model.layers[0].self_attn.num_kv_heads == 1
        assert greedy_ids(llm, prompts) == expected
    proc, url = start_server(None, tmp_path, "parallel.tp=3")
    try:
        wait_ready(proc, url, timeout=300)
        assert len(httpx.get(f"{url}/health").json()["tp_rank_pids"]) == 2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        resp = client.completions.create(model=MODEL, prompt=PROMPTS[:4], max_tokens=10, temperature=0)
        assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == texts
    finally:
        stop(proc)


def test_tp_that_does_not_divide_the_heads_is_refused(tiny_qwen3, tmp_path):
    with pytest.raises(ValueError, match="parallel.tp=3"):
        LLM(str(tiny_qwen3), **KW, **{"parallel.tp": 3})  # 4 heads
    proc, _ = start_server(tiny_qwen3, tmp_path, "parallel.tp=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "parallel.tp=3" in out


def test_server_tp2_serves_and_fails_cleanly_when_a_rank_dies(tiny_qwen3, tmp_path):
    single = LLM(str(tiny_qwen3), **KW)
    expected = single.generate(PROMPTS[:3], max_tokens=8, temperature=0)
    proc, url = start_server(tiny_qwen3, tmp_path, "parallel.tp=2")
    try:
        wait_ready(proc, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        resp = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=8, temperature=0)
        assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == expected
        (rank1,) = httpx.get(f"{url}/health").json()["tp_rank_pids"]
        stream = client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        os.kill(rank1, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        deadline = time.time() + 20
        while httpx.get(f"{url}/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 503
    finally:
        stop(proc)
