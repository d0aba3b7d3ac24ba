"""Greedy output token-identical to transformers' generate, and logprobs within 1e-3, on a tiny random
Qwen3 (fp32) under every engine configuration that changes how the work is scheduled or computed."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_greedy, trim_at_eos

from engine import LLM, SamplingParams

MAX_NEW = 12
SHARED = (
    "You are a careful assistant. Answer briefly and precisely, and never invent facts. "
    "Think about the question before answering it. "
)

CONFIGS = {
    "eager": dict(enforce_eager=True),
    "chunked-prefill-7": dict(enforce_eager=True, max_num_batched_tokens=7),
    "page-size-4": dict(enforce_eager=True, page_size=4),
    "no-prefix-cache": dict(enforce_eager=True, cache="none"),
    "lpm": dict(enforce_eager=True, scheduler="lpm", max_num_batched_tokens=32),
    "priority": dict(enforce_eager=True, scheduler="priority", max_running_requests=3),
    "max-running-3": dict(enforce_eager=True, max_running_requests=3),
    "flex": dict(enforce_eager=True, attention="flex"),
    # Both graphs: prefill chunks of 32 tokens leave some steps with one or no row to sample.
    "compiled": dict(max_num_batched_tokens=32),
    # One decoder layer's code shared by every layer (the default for quantized CPU models), float here.
    "compiled-regional": {"max_num_batched_tokens": 32, "compile.regional": True},
    # ~40 tokens of KV per sequence at page size 4 -> 16 pages is enough for one or two at a time.
    "preempting": dict(enforce_eager=True, page_size=4, num_pages=17, max_num_batched_tokens=64),
    # Steps scheduled while the one before runs, the compiled graphs called from the step thread (engine/overlap.py).
    "overlap-compiled": dict(max_num_batched_tokens=32, overlap=True),
}
SLOW = {"flex", "compiled", "compiled-regional", "overlap-compiled"}


def _prompt_ids(tok) -> list[list[int]]:
    base = [tok.encode(p) for p in PROMPTS]
    shared = [tok.encode(SHARED + p) for p in PROMPTS[:4]]
    return base + shared + [base[1], base[1]]  # shared prefixes and repeats hit the prefix cache


@pytest.fixture(scope="module")
def reference(hf_tiny_qwen3, qwen_tokenizer):
    ids = _prompt_ids(qwen_tokenizer)
    return ids, hf_greedy(hf_tiny_qwen3, ids, MAX_NEW)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CONFIGS])
def test_greedy_matches_transformers(name, tiny_qwen3, reference, device):
    ids, expected = reference
    llm = LLM(str(tiny_qwen3), dtype=torch.float32, progress_bar=False, device=device, **CONFIGS[name])
    eos = llm.engine.eos_token_ids
    for attempt in range(2):  # the second pass finds every prompt in the prefix cache
        outs = llm.generate_outputs(ids, SamplingParams(max_tokens=MAX_NEW, temperature=0))
        got = [o.outputs[0].token_ids for o in outs]
        assert got == [trim_at_eos(e, eos) for e in expected], f"{name}, pass {attempt}"
    stats = llm.engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_pages_free"] + stats["kv_pages_evictable"] == stats["kv_pages_total"], "KV pages leaked"
    assert llm.engine.runner.graphs.regional == (name == "compiled-regional")
    if name == "preempting":
        assert stats["preemptions"] > 0, "the pool was meant to be too small for the batch"
    if CONFIGS[name].get("cache") != "none":
        assert sum(o.usage.cached_tokens for o in outs) > 0, "repeated prompts should hit the prefix cache"
    else:
        assert all(o.usage.cached_tokens == 0 for o in outs)


@pytest.mark.parametrize(
    "eager", [pytest.param(True, id="eager"), pytest.param(False, marks=pytest.mark.slow, id="compiled")]
)
def test_logprobs_match_transformers(eager, tiny_qwen3, hf_tiny_qwen3, qwen_tokenizer, device):
    llm = LLM(
        str(tiny_qwen3),
        dtype=torch.float32,
        enforce_eager=eager,
        progress_bar=False,
        device=device,
        max_num_batched_tokens=5,
    )  # prompt logprobs gathered across several prefill chunks
    prompts = [qwen_tokenizer.encode(p) for p in PROMPTS[:4]]
    outs = llm.generate_outputs(
        prompts, SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=3, prompt_logprobs=2)
    )
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf_tiny_qwen3(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for pos in range(1, len(ids)):
            lp, top = out.prompt_logprobs[pos]
            assert abs(lp - ref[pos - 1, ids[pos]].item()) < 1e-3
            assert [t for t, _ in top] == ref[pos - 1].topk(2).indices.tolist()
        (first,) = out.outputs[0].token_ids
        lp, top = out.outputs[0].logprobs[0]
        assert first == ref[-1].argmax().item()
        assert abs(lp - ref[-1, first].item()) < 1e-3
        assert [t for t, _ in top] == ref[-1].topk(3).indices.tolist()
        assert all(abs(v - ref[-1, t].item()) < 1e-3 for t, v in top)


def test_bf16_runs_close_to_fp32(tiny_qwen3, qwen_tokenizer, device):
    """bf16 (the `auto` dtype where the hardware has it) cannot be token-exact, but must agree on the
    first tokens."""
    ids = [qwen_tokenizer.encode(p) for p in PROMPTS[:4]]
    f32 = LLM(str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False, device=device)
    b16 = LLM(str(tiny_qwen3), dtype="bfloat16", enforce_eager=True, progress_bar=False, device=device)
    assert b16.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    a = f32.generate_outputs(ids, max_tokens=2, temperature=0)
    b = b16.generate_outputs(ids, max_tokens=2, temperature=0)
    agree = sum(x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0] for x, y in zip(a, b))
    assert agree >= 3


def test_auto_dtype_follows_the_hardware(tiny_qwen3, device):
    llm = LLM(str(tiny_qwen3), enforce_eager=True, progress_bar=False, device=device)  # dtype="auto"
    native_bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert llm.engine.model.embed_tokens.weight.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    with pytest.raises(ValueError, match="auto"):
        LLM(str(tiny_qwen3), dtype="float8", enforce_eager=True, progress_bar=False)
