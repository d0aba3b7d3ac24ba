"""The compiled decode path's attention against SDPA over the gathered context, background compilation, and
graphs that stay with their own model."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, hf_greedy, trim_at_eos

from engine import LLM, SamplingParams
from engine.kernels.decode_attention import paged_decode_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_matches_sdpa(dtype, device):
    torch.manual_seed(0)
    b, kv_heads, group, dim, page_size, num_pages, width = 5, 2, 3, 16, 4, 40, 6
    k_cache = torch.randn(num_pages, page_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_pages, page_size, kv_heads, dim).to(dtype)
    # Scattered pages, rows of different lengths (one a single token), table padded with page 0.
    lengths = [1, 5, 13, 24, 17]
    table = torch.zeros(b, width, dtype=torch.long)
    perm = torch.randperm(num_pages - 1) + 1
    used = 0
    for row, n in enumerate(lengths):
        pages = -(-n // page_size)
        table[row, :pages] = perm[used : used + pages]
        used += pages
    positions = torch.tensor(lengths) - 1
    q = torch.randn(b, kv_heads * group, dim).to(dtype)

    got = paged_decode_attention(*(t.to(device) for t in (q, k_cache, v_cache, table, positions))).cpu()

    keys = k_cache[table].reshape(b, width * page_size, kv_heads, dim).transpose(1, 2)
    values = v_cache[table].reshape(b, width * page_size, kv_heads, dim).transpose(1, 2)
    mask = (torch.arange(width * page_size) <= positions.view(-1, 1)).view(b, 1, 1, -1)
    want = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys.float(), values.float(), attn_mask=mask, enable_gqa=True
    ).squeeze(2)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tol), (got.float() - want).abs().max()


BACKENDS = {
    "sdpa": "engine.kernels.sdpa_attention.SDPAAttention",
    "triton": "engine.kernels.triton_attention.TritonAttention",  # CPU: Triton's interpreter (conftest)
}
# (cached tokens, new tokens) per row
MIXED_ROWS = [(0, 6), (0, 6), (0, 11), (9, 5), (14, 1), (3, 1), (0, 40), (21, 37)]
DECODE_ROWS = [(0, 1), (4, 1), (12, 1), (23, 1), (16, 1), (70, 1)]


def backend_class(name: str) -> type:
    module, _, cls = BACKENDS[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("window", [0, 7], ids=["full", "window-7"])
@pytest.mark.parametrize("rows", [MIXED_ROWS, DECODE_ROWS], ids=["mixed", "decode"])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_step_attention_matches_each_row_alone(name, rows, window, device):
    """A step mixing whole prompts (two of one length, so SDPA gives them one call), a chunk after a cached
    prefix, single-token rows and prompts longer than the Triton kernel's query block; and a decode-only
    step (also through `decode`, the compiled path): each row's output equals causal attention over its own
    context, or over the last `window` positions of it (a sliding layer, with a softmax scale of its own;
    the step's rows are longer than the window, so the window cuts whole prompts too)."""
    from engine.kernels.paged import PagedBatch

    torch.manual_seed(0)
    kv_heads, group, dim, page_size, num_pages = 2, 3, 16, 4, 64
    k_cache = torch.randn(num_pages, page_size, kv_heads, dim, device=device)
    v_cache = torch.randn(num_pages, page_size, kv_heads, dim, device=device)
    backend = backend_class(name)([k_cache], [v_cache], page_size)
    backend.use_windows((window,) if window else ())
    scale = 0.3 if window else None
    width = max(-(-(c + n) // page_size) for c, n in rows)
    perm = (torch.randperm(num_pages - 1) + 1).tolist()
    table, positions, slots, pad_index = [], [], [], []
    longest = max(n for _, n in rows)
    for r, (cached, n) in enumerate(rows):
        pages = [perm.pop() for _ in range(-(-(cached + n) // page_size))]
        table.append(pages + [0] * (width - len(pages)))
        positions += range(cached, cached + n)
        slots += [pages[p // page_size] * page_size + p % page_size for p in range(cached, cached + n)]
        pad_index += range(r * longest, r * longest + n)
    batch = PagedBatch(
        positions=torch.tensor(positions, device=device),
        slot_mapping=torch.tensor(slots, device=device),
        page_table=torch.tensor(table, device=device),
        seq_lens=torch.tensor([c + n for c, n in rows], device=device),
        max_query_len=longest,
        pad_index=torch.tensor(pad_index, device=device) if longest > 1 else None,
        query_lens=[n for _, n in rows],
        host_seq_lens=[c + n for c, n in rows],
    )
    tokens = len(positions)
    q, k, v = (torch.randn(tokens, kv_heads * g, dim, device=device) for g in (group, 1, 1))
    meta = backend.prepare(batch)
    if name == "sdpa" and longest > 1:
        assert len(meta[1]) == 6, "equal whole prompts share a call; the single-token rows share one"
    got = backend.forward(backend.layer_cache(0), q, k, v, meta, window, scale)
    if longest == 1:
        decoded = backend.decode(backend.layer_cache(0), q, k, v, backend.prepare_decode(batch), window, scale)
        assert torch.allclose(decoded, got, atol=1e-5)

    start = 0
    for r, (cached, n) in enumerate(rows):
        context = torch.tensor(table[r], device=device)
        keys = k_cache[context].reshape(-1, kv_heads, dim)[: cached + n].transpose(0, 1)
        values = v_cache[context].reshape(-1, kv_heads, dim)[: cached + n].transpose(0, 1)
        kv_pos = torch.arange(cached + n, device=device)
        q_pos = torch.arange(cached, cached + n, device=device)[:, None]
        visible = (kv_pos <= q_pos) & ((kv_pos > q_pos - window) if window else True)
        want = F.scaled_dot_product_attention(
            q[start : start + n].transpose(0, 1), keys, values, attn_mask=visible, enable_gqa=True, scale=scale
        ).transpose(0, 1)
        assert torch.allclose(got[start : start + n], want, atol=1e-5), (r, (got[start : start + n] - want).abs().max())
        start += n


@pytest.mark.slow
@pytest.mark.parametrize(
    "regional, invariant", [(None, False), (True, False), (None, True)], ids=["default", "regional", "batch-invariant"]
)
def test_background_compile_serves_eagerly_then_compiled(
    regional, invariant, tiny_qwen3, hf_tiny_qwen3, qwen_tokenizer, device
):
    if invariant and device != "cpu":
        pytest.skip("batch_invariant is built for the CPU")
    ids = [qwen_tokenizer.encode(p) for p in PROMPTS]
    short = ids[0][:3]
    expected = hf_greedy(hf_tiny_qwen3, ids, 8)
    overrides = {"compile.warmup": "background", "compile.regional": regional, "batch_invariant": invariant}
    llm = LLM(str(tiny_qwen3), dtype=torch.float32, progress_bar=False, device=device, **overrides)
    runner = llm.engine.runner
    compiled_plans = []
    plan = runner.plan

    def spy(batch, *args):
        out = plan(batch, *args)
        compiled_plans.append((out[0].compiled, "decode" if out[0].logit_rows is None else "prefill"))
        return out

    runner.plan = spy
    params = SamplingParams(max_tokens=8, temperature=0)
    eos = llm.engine.eos_token_ids
    want = [trim_at_eos(e, eos) for e in expected]
    want_short = [trim_at_eos(hf_greedy(hf_tiny_qwen3, [short], 8)[0], eos)]
    # Right after start the graphs are still compiling: requests are answered, eagerly.
    assert [o.outputs[0].token_ids for o in llm.generate_outputs(ids, params)] == want
    assert runner.compiled_ready.wait(timeout=600), "the background compilation never finished"
    compiled_plans.clear()
    llm.engine.prefix_cache.reset()
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert [o.outputs[0].token_ids for o in llm.generate_outputs(ids, params)] == want
    # A short prompt alone (a prefill step of 3 tokens) is padded into the prefill graph's shapes.
    assert [o.outputs[0].token_ids for o in llm.generate_outputs([short], params)] == want_short
    # The warm-up's graphs serve the real steps: its inputs once differed in a guarded detail (inference
    # tensors, aliased arguments) and every graph compiled again on the first request.
    assert counters["stats"]["unique_graphs"] == graphs, "a graph compiled again after the warm-up"
    assert sum(counters["graph_break"].values()) == breaks
    assert (True, "decode") in compiled_plans, "decode steps should run the compiled graph once it is ready"
    assert (True, "prefill") in compiled_plans, "prefill steps should run the compiled graph once it is ready"


def test_background_warm_up_covers_every_count_of_sampled_prompts(tiny_qwen3, qwen_tokenizer, device):
    """A quantized head computes up to 4, up to 8 and more rows by different code (kernels/quant_linear.py), so
    the prefill graph has a variant per class: warmed up at 2 rows only, a step prefilling 5 prompts compiled
    one in the middle of serving, and one of 9 prompts another."""
    if device != "cpu":
        pytest.skip("quantized weights are built for the CPU")
    overrides = {"quant": "int4", "compile.warmup": "background"}
    llm = LLM(str(tiny_qwen3), dtype=torch.float32, progress_bar=False, **overrides)
    assert llm.engine.runner.compiled_ready.wait(timeout=600), "the background compilation never finished"
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    ids = [qwen_tokenizer.encode(p) for p in PROMPTS]
    for count in (1, 5, 10):
        prompts = (ids * 2)[:count]
        llm.generate_outputs(prompts, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert counters["stats"]["unique_graphs"] == graphs, "a graph compiled after the warm-up"


def test_models_of_one_shape_keep_their_own_graphs(tiny_qwen3, qwen_tokenizer, tmp_path, device):
    """The step graphs skip dynamo's guards on the model's modules, so a graph compiled for one model must
    never serve another: here a second checkpoint with the same tensor shapes differs only in a float
    attribute that the graphs bake in as a constant (every RMSNorm's eps)."""
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-eps"
    shutil.copytree(tiny_qwen3, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    ids = [qwen_tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got = []
    for path in (tiny_qwen3, other):
        llm = LLM(str(path), dtype=torch.float32, progress_bar=False, device=device)
        eos = llm.engine.eos_token_ids
        got.append([trim_at_eos(o.outputs[0].token_ids, eos) for o in llm.generate_outputs(ids, params)])
        assert llm.engine.runner.graphs.decode is not None
    hf = AutoModelForCausalLM.from_pretrained(other, torch_dtype=torch.float32).eval()
    assert got[1] == [trim_at_eos(t, eos) for t in hf_greedy(hf, ids, 8)]
    assert got[0] != got[1], "the two models should generate differently for this test to mean anything"
