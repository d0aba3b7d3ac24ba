"""Batch-invariant mode (`batch_invariant=true`, kernels/row_invariant.py): a request's greedy tokens and its
logprobs, bit for bit, are the same whether it runs alone, in a batch, or arrives while others decode (its
prompt chunked beside them), for every quant mode, in fp32 and bf16, eager and compiled; with speculative
decoding too, and for a mixture-of-experts model. Without the mode the same runs differ (so the comparison can
fail)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_model_families import tiny_qwen3_moe
from test_quantization import MODES, write_tiny_gguf

from engine import LLM, SamplingParams
from engine.config import ConfigError, compose_config

# Prompts of 5..47 tokens: with a budget of 16 the longer ones are chunked, and the staggered run puts their
# chunks in the steps between others' decode steps; 7 of them make a decode step of 7 rows.
PROMPTS = [[(37 * i + 11 * j) % 200 + 50 for j in range(5 + 7 * i)] for i in range(7)]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q4.gguf")


Result = tuple[list[int], list[float]]


def _of(output) -> Result:
    choice = output.outputs[0]
    return choice.token_ids, [lp for lp, _ in choice.logprobs]


def three_ways(llm: LLM, prompts: list[list[int]]) -> tuple[list[Result], list[Result], list[Result]]:
    """Each prompt alone; all together; and arriving one by one, two steps apart, while the earlier decode."""
    alone = [_of(llm.generate_outputs([p], PARAMS)[0]) for p in prompts]
    together = [_of(o) for o in llm.generate_outputs(prompts, PARAMS)]
    requests = []
    for p in prompts:
        requests.append(llm._submit(None, p, PARAMS))
        for _ in range(2):
            llm._step()
    while not all(r.finished for r in requests):
        llm._step()
    return alone, together, [_of(r.output()) for r in requests]


def assert_invariant(llm: LLM, prompts: list[list[int]] = PROMPTS, want: list[Result] | None = None) -> None:
    """The three runs agree bit for bit (and with `want` where given)."""
    alone, together, staggered = three_ways(llm, prompts)
    assert all(len(tokens) == PARAMS.max_tokens for tokens, _ in alone)
    assert together == alone
    assert staggered == alone
    assert want is None or alone == want


# Compiled runs take minutes each (a decode graph per row bucket): the float path and the int4 one in bf16.
CASES = [(quant, dtype, False) for quant in MODES for dtype in ("float32", "bfloat16")]
CASES += [pytest.param(q, d, True, marks=pytest.mark.slow) for q, d in (("none", "float32"), ("auto", "bfloat16"))]


@pytest.mark.parametrize("quant, dtype, compiled", CASES)
def test_a_request_computes_the_same_alone_batched_and_among_decodes(
    tiny_gguf, quant, dtype, compiled, tmp_path, monkeypatch
):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    llm = LLM(
        str(tiny_gguf),
        dtype=dtype,
        quant=quant,
        enforce_eager=not compiled,
        cache="none",
        max_num_batched_tokens=16,
        batch_invariant=True,
        progress_bar=False,
    )
    assert_invariant(llm)


def test_without_the_mode_the_same_runs_differ(tiny_gguf, tmp_path, monkeypatch):
    """The comparison above can fail: float GEMMs of different row counts and mixed steps part the bits."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    llm = LLM(
        str(tiny_gguf),
        dtype="float32",
        quant="none",
        enforce_eager=True,
        cache="none",
        max_num_batched_tokens=16,
        progress_bar=False,
    )
    alone, together, staggered = three_ways(llm, PROMPTS)
    assert together != alone and staggered != alone


def test_speculation_and_experts_stay_invariant(tiny_gguf, tmp_path, monkeypatch):
    """Greedy n-gram speculation (its verification rows are decode rows) and a mixture-of-experts model (its
    eager per-expert GEMMs take the fixed shapes too) give every request the bits it gets alone without them."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    common = dict(enforce_eager=True, cache="none", max_num_batched_tokens=16, batch_invariant=True, progress_bar=False)
    plain = LLM(str(tiny_gguf), dtype="float32", quant="int4", **common)
    want = [_of(plain.generate_outputs([p], PARAMS)[0]) for p in PROMPTS]
    spec = LLM(
        str(tiny_gguf), dtype="float32", quant="int4", spec="ngram", **{"spec.only_when_faster": False}, **common
    )
    assert [_of(o) for o in spec.generate_outputs(PROMPTS, PARAMS)] == want
    assert spec.engine.spec_stats["spec_proposed_tokens"] > 0  # verification steps ran

    moe = LLM(str(tiny_qwen3_moe(tmp_path / "moe")), dtype="float32", **common)
    assert_invariant(moe)


def test_prefix_cache_hits_do_not_change_a_request(tiny_gguf, tmp_path, monkeypatch):
    """With the radix cache a prompt reuses a cached prefix only up to a multiple of the budget, where its fixed
    chunks start: its rows after it are computed in the chunks they have without the cache, so the bits match a
    run with no cache at all, and hits happened."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    shared = PROMPTS[-1][:37]  # two whole chunks of 16 and 5 tokens more
    prompts = [shared + p[:9] for p in PROMPTS]
    common = dict(enforce_eager=True, max_num_batched_tokens=16, page_size=4, batch_invariant=True, progress_bar=False)
    fresh = LLM(str(tiny_gguf), dtype="float32", quant="int4", cache="none", **common)
    want = [_of(fresh.generate_outputs([p], PARAMS)[0]) for p in prompts]
    cached = LLM(str(tiny_gguf), dtype="float32", quant="int4", cache="radix", **common)
    assert_invariant(cached, prompts, want)
    (again,) = cached.generate_outputs([prompts[0]], PARAMS)
    # 41 tokens before its last are cached in 10 pages of 4; 32 of them end a chunk of the budget.
    assert again.usage.cached_tokens == 32 and _of(again) == want[0]


@pytest.mark.parametrize("setting", [{"device": "cuda"}, {"parallel.tp": 2}, {"attention": "flex"}])
def test_batch_invariance_is_refused_where_it_is_not_built(setting):
    with pytest.raises(ConfigError, match="batch_invariant"):
        compose_config(batch_invariant=True, **setting)
