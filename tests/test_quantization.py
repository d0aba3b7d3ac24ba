"""Quantized weights (quant=int8|int4|auto): the GGUF 4-bit repack is lossless, the layers compute what a
float layer on the same weights computes, a GGUF of 4-bit blocks generates the tokens transformers
generates from it, int8/int4 keep SmolLM2's perplexity, and loading streams into the engine cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, hf_greedy, trim_at_eos

from engine import LLM, SamplingParams
from engine.config import ConfigError, compose_config, group_choices
from engine.kernels import quant_linear
from engine.kernels.quant_linear import (
    GroupedInt8Embedding,
    GroupedInt8Experts,
    GroupedInt8Linear,
    Int4Linear,
    Int8Embedding,
    Int8Experts,
    Int8Linear,
    PackedInt4Linear,
    packs_int4,
    quantize_int4_groups,
)
from engine.models.loader import QUANTIZED_LAYOUT
from engine.models.source import embedded_model_path, gguf_cache_dir
from engine.parallel import TPGroup
from engine.quant.auto import Auto
from engine.quant.base import NoQuant, QuantScheme
from engine.quant.int4 import int4_groups
from engine.quant.int8_groups import GroupedInt8Format, int8_groups

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parent.parent


def blocks(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    """GGUF bytes [rows, row bytes] of a random tensor. gguf-py cannot quantize to Q4_K: its blocks are
    random bytes with small fp16 super-block scales (every bit pattern of the rest is a valid block)."""
    rng = np.random.default_rng(seed)
    if qtype != Q.Q4_K:
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), qtype)
    n = rows * cols // 256
    scales = rng.uniform(1e-4, 2e-3, (n, 2)).astype(np.float16).view(np.uint8)
    return np.concatenate([scales, rng.integers(0, 256, (n, 140), dtype=np.uint8)], axis=1).reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_repack_is_lossless(qtype):
    raw = blocks(96, 512, qtype)
    layer = Int4Linear(512, 96)
    layer.load_groups(slice(None), *int4_groups(raw, qtype.name))
    assert torch.equal(layer.dequantized(), torch.from_numpy(gguf.dequantize(raw, qtype)))


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("out_features", [160, 100])  # whole tiles of 16 rows, and a padded last tile
def test_int4_layer_computes_the_float_product(rows, compiled, out_features):
    torch.manual_seed(0)
    layer = Int4Linear(256, out_features, bias=True)
    w = torch.randn(out_features, 256)
    for part in (slice(0, 37), slice(37, None)):  # loaded in pieces across tiles, as shards are
        layer.load_rows(part, w[part])
    q, scale, offset = quantize_int4_groups(w)
    want_w = (q.float().reshape(out_features, -1, 32) * scale[..., None] + offset[..., None]).flatten(1)
    assert torch.equal(layer.dequantized(), want_w)
    layer.bias.copy_(torch.randn(out_features))
    x = torch.randn(rows, 256)
    fn = torch.compile(layer, dynamic=False) if compiled else layer
    with torch.inference_mode():
        got = fn(x)
    assert torch.allclose(got, F.linear(x, layer.dequantized(), layer.bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q5_1, Q.Q4_1])
def test_grouped_int8_holds_symmetric_blocks_exactly_and_others_within_8_bits(qtype):
    """Q8_0, Q5_0 and Q4_0 (one scale times small integers) taken as their blocks: bit-exact. Q5_1 and Q4_1 (an
    offset too) rounded per group of 32: within half a step of each group's 8 bits."""
    raw = blocks(96, 512, qtype)
    want = torch.from_numpy(gguf.dequantize(raw, qtype))
    layer = GroupedInt8Linear(512, 96)
    if qtype.name in GroupedInt8Format.exact_types:
        layer.load_groups(slice(None), *int8_groups(raw, qtype.name))
        assert torch.equal(layer.dequantized(), want)
    else:
        layer.load_rows(slice(None), want)
        step = want.reshape(96, 16, 32).abs().amax(-1, keepdim=True) / 127
        assert ((layer.dequantized() - want).reshape(96, 16, 32).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 4, 9, 40])
@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_int8_layer_and_embedding_compute_their_float_values(rows, compiled, monkeypatch):
    """One row (fused reduction), few rows (each alone), several rows (float weight in pieces), and the table."""
    monkeypatch.setattr(quant_linear, "FLOAT_PIECE_BYTES", 128 * 4 * 64)  # 300 rows in 5 pieces
    torch.manual_seed(0)
    w = torch.randn(300, 128)
    layer, table = GroupedInt8Linear(128, 300, bias=True), GroupedInt8Embedding(300, 128)
    for part in (slice(0, 37), slice(37, None)):
        layer.load_rows(part, w[part])
    table.load_rows(slice(None), w)
    layer.bias.copy_(torch.randn(300))
    x = torch.randn(rows, 128)
    fn = torch.compile(layer, dynamic=False) if compiled else layer
    with torch.inference_mode():
        got = fn(x)
    assert torch.allclose(got, F.linear(x, layer.dequantized(), layer.bias), rtol=1e-5, atol=1e-4)
    ids = torch.tensor([[0, 299], [5, 37]])
    assert torch.equal(table(ids), layer.dequantized()[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_int8_several_rows_multiply_in_the_models_dtype(dtype, monkeypatch):
    """A bfloat16 model's head of 9+ rows runs bf16 GEMMs on pieces rounded once from their fp32 values (fp32 ones
    took 2.8x as long on an AVX-512 BF16 CPU); a float32 model's stays fp32."""
    monkeypatch.setattr(quant_linear, "FLOAT_PIECE_BYTES", 128 * 4 * 64)
    torch.manual_seed(0)
    layer = GroupedInt8Linear(128, 300)
    layer.load_rows(slice(None), torch.randn(300, 128))
    layer = layer.to(dtype)
    x = torch.randn(12, 128).to(dtype)
    operands = []

    def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        operands.append((a.dtype, b.dtype))
        return a @ b

    got = layer._several_rows(x, gemm)
    assert len(operands) > 1 and set(operands) == {(dtype, dtype)}
    want = (
        x @ (layer.qweight.float().unflatten(-1, (-1, 32)) * layer.scale.float()[..., None]).flatten(-2).to(dtype).t()
    )
    assert got.dtype == dtype and torch.allclose(
        got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5
    )


LAYERS = {"int4": Int4Linear, "int8": Int8Linear, "int8_groups": GroupedInt8Linear}


@pytest.mark.parametrize("fmt", list(LAYERS))
@pytest.mark.parametrize("compiled", [False, True])
def test_up_to_eight_rows_compute_each_row_as_a_lone_row(fmt, compiled):
    """Batch invariance of the quantized kernels below 9 rows: every row of a 2..8-row product is bit-identical
    to that row computed alone (a speculative verification then agrees with plain decoding)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # graphs of these layers' methods compiled by other tests (other shapes) stay cached
    layer = LAYERS[fmt](256, 100)
    layer.load_rows(slice(None), torch.randn(100, 256))
    fn = torch.compile(layer, dynamic=True) if compiled else layer
    with torch.inference_mode():
        for rows in (2, 3, 5, 8):
            x = torch.randn(rows, 256)
            together = fn(x)
            for i in range(rows):
                assert torch.equal(together[i], fn(x[i : i + 1])[0]), (rows, i)


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_int4_layer_holds_the_int4_values_and_computes_each_row_alone(compiled):
    """A bfloat16 model's int4 layers in ATen's packed layout (PackedInt4Linear): its weight is the int4 layer's up
    to bf16 rounding of the scales, zeros and values; up to 8 rows every row is bit-identical to the row alone (one
    kernel for any row count: no padding), compiled and eager alike; 9 and 40 rows (dequantize + GEMM) compute the
    same product within bf16 rounding. 192 outputs: whole blocks of the AVX-512 (64) and AVX2 (32) layouts."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    base = Int4Linear(256, 192, bias=True)
    base.load_rows(slice(None), torch.randn(192, 256))
    base.bias.copy_(torch.randn(192))
    assert packs_int4(base, torch.bfloat16) and not packs_int4(base, torch.float32)
    assert not packs_int4(Int4Linear(256, 200), torch.bfloat16)  # a partial block is packed another way
    layer = PackedInt4Linear(base).to(torch.bfloat16)
    w = base.dequantized()
    scale = base.scale.permute(1, 0, 2).reshape(8, -1)[:, :192].repeat_interleave(32, 0).t()  # [N, K]
    bound = 2**-8 * (9 * scale + w.abs()) + 1e-6  # the scale, zero and value each rounded to bf16
    assert ((layer.dequantized().float() - w).abs() <= bound).all()
    fn = torch.compile(layer, dynamic=True) if compiled else layer
    with torch.inference_mode():
        for rows in (1, 2, 5, 8, 9, 40):
            x = torch.randn(rows, 256).to(torch.bfloat16)
            out = fn(x)
            want = x.float() @ w.t() + base.bias
            assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
            assert torch.allclose(out.float(), want, rtol=0.02, atol=0.05 * want.abs().mean()), rows
            if rows <= quant_linear.FEW_ROWS:
                assert all(torch.equal(out[i], layer(x[i : i + 1])[0]) for i in range(rows)), rows


def test_int4_quantizer_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    layer = Int4Linear(256, 64)
    layer.load_rows(slice(None), w)
    step = (w.reshape(64, 8, 32).amax(-1) - w.reshape(64, 8, 32).amin(-1)) / 15
    err = (layer.dequantized() - w).abs().reshape(64, 8, 32).amax(-1)
    assert (err <= step / 2 + 1e-6).all()  # round to nearest of 16 levels spanning each group


@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("int8_gemm", [True, False])  # `_int_mm` (VNNI CPUs), or the float weight in pieces
def test_int8_layer_and_embedding(rows, digits, int8_gemm, monkeypatch):
    monkeypatch.setattr(quant_linear, "INT8_GEMM", int8_gemm)
    monkeypatch.setattr(quant_linear, "FLOAT_PIECE_BYTES", 128 * 4 * 64)  # 300 rows in 5 pieces
    torch.manual_seed(0)
    w = torch.randn(300, 128)
    layer, table = Int8Linear(128, 300, digits=digits), Int8Embedding(300, 128)
    layer.load_rows(slice(None), w)
    table.load_rows(slice(None), w)
    x = torch.randn(rows, 128)
    want = F.linear(x, w)
    rel = (layer(x) - want).norm() / want.norm()
    assert rel < 0.02, rel  # weights and activations both at 8 bits
    ids = torch.tensor([0, 299, 5])
    assert torch.allclose(table(ids), w[ids], atol=w.abs().max().item() / 127)


@pytest.mark.parametrize("kind", [Int8Experts, GroupedInt8Experts])
@pytest.mark.parametrize("compiled", [False, True])
def test_int8_experts_compute_the_float_moe_on_their_own_values(compiled, kind):
    """An MoE layer with int8 experts (a scale per row, or per 32 inputs) computes what the float layer computes
    from the dequantized experts: the eager path (a GEMM per expert) and the compiled one (products over each
    token's gathered experts)."""
    from engine.models.transformer import ModelConfig, MoE

    cfg = ModelConfig(
        architecture="qwen3_moe", vocab_size=8, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, moe_layers=[0], rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
        tie_word_embeddings=False, hidden_act="silu",
    )  # fmt: skip
    torch.manual_seed(0)
    reference, quantized = MoE(cfg, TPGroup()), MoE(cfg, TPGroup())
    for p in reference.parameters():
        p.data.normal_(0, 0.2)
    quantized.gate.load_state_dict(reference.gate.state_dict())
    for name in ("experts_gate_up", "experts_down"):
        experts = kind(*getattr(reference, name).weight_shape)
        experts.load_rows(slice(None), getattr(reference, name).weight.data)
        setattr(quantized, name, experts)
        dequantized = torch.stack([experts.expert(e) for e in range(cfg.num_experts)])
        assert (dequantized - getattr(reference, name).weight).abs().max() <= experts.scale.max() / 2 + 1e-7
        getattr(reference, name).weight.data.copy_(dequantized)
    x = torch.randn(9, 64)
    run = torch.compile(quantized, fullgraph=True) if compiled else quantized
    with torch.no_grad():
        torch.testing.assert_close(run(x), reference(x), atol=1e-5, rtol=1e-5)


def test_plan_keeps_each_tensors_precision_class():
    parts = {
        "layers.0.self_attn.qkv_proj": ["Q4_K", "Q4_K", "Q6_K"],  # Q4_K_M's mix: the precise part wins
        "layers.0.mlp.gate_up_proj": ["Q4_1", "Q4_0"],
        "layers.0.mlp.down_proj": ["F16"],
        "embed_tokens": ["Q4_K"],
        "lm_head": ["Q8_0"],
        "layers.1.mlp.experts_gate_up": ["Q4_K"],
        "layers.1.mlp.experts_down": ["Q8_0"],
    }
    auto = compose_config(quant="auto").quant.build()
    assert auto.plan(parts) == {
        "layers.0.self_attn.qkv_proj": "int8_groups",
        "layers.0.mlp.gate_up_proj": "int4",
        "embed_tokens": "int8_groups",  # what int4 cannot hold goes where the file's other types go
        "lm_head": "int8_groups",
        "layers.1.mlp.experts_gate_up": "int8_groups",  # int4 does not hold experts
        "layers.1.mlp.experts_down": "int8_groups",
    }
    assert set(compose_config(quant="int4").quant.build().plan(parts).values()) == {"int4", "int8"}  # heads int8
    assert compose_config(quant="none").quant.build().plan(parts) == {}


MODES = ("auto", "int4", "int8", "int8_groups", "none")


def test_quant_group_files_are_schemes():
    assert group_choices("quant") == sorted(MODES)
    schemes = {mode: compose_config(quant=mode).quant.build() for mode in MODES}
    assert all(isinstance(s, QuantScheme) for s in schemes.values())
    assert {mode: s.name for mode, s in schemes.items()} == {m: m for m in MODES}  # also their cache folders
    assert isinstance(compose_config().quant.build(), Auto)


def test_bad_quant_settings_are_refused():
    with pytest.raises(ValueError, match="quant='int3'"):
        compose_config(quant="int3")
    with pytest.raises(ConfigError, match="quant=.*parallel.tp=2"):
        compose_config(quant="int8", **{"parallel.tp": 2})
    auto = compose_config(**{"parallel.tp": 2}).quant.build()
    assert isinstance(auto.for_placement("cpu", 2), NoQuant)  # auto loads float weights under TP
    with pytest.raises(ConfigError, match="quant=.*GPU"):
        compose_config(quant="int4", device="cuda")
    assert isinstance(auto.for_placement("cuda", 1), NoQuant)  # ... and on a GPU


# ------------------------------------------------------------------------------ a tiny 4-bit GGUF model

TINY = dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512)
TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_K}
TYPES |= {"ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_K, "ffn_down": Q.Q4_0}


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer llama GGUF whose linear layers are Q4_0/Q4_1/Q4_K blocks (F16 embeddings and head,
    F32 norms), with SmolLM2's tokenizer."""
    source = gguf.GGUFReader(str(embedded_model_path()))
    h, d = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(h)
    w.add_block_count(TINY["layers"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d)
    for field in source.fields.values():
        if field.name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), kind, sub)
    vocab = int(next(t for t in source.tensors if t.name == "token_embd.weight").shape[1])
    rng = np.random.default_rng(1)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, h)).astype(np.float16))
    w.add_tensor("output.weight", (rng.standard_normal((vocab, h)) * 0.05).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    shapes = {"attn_q": (h, h), "attn_k": (TINY["kv_heads"] * d, h), "attn_v": (TINY["kv_heads"] * d, h)}
    shapes |= {"attn_output": (h, h), "ffn_gate": (TINY["ffn"], h), "ffn_up": (TINY["ffn"], h)}
    shapes |= {"ffn_down": (h, TINY["ffn"])}
    for layer in range(TINY["layers"]):
        for name, (rows, cols) in shapes.items():
            raw = blocks(rows, cols, TYPES[name], seed=layer * 10 + len(name))
            w.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=TYPES[name])
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{norm}.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q4.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("eager", [True, False])
def test_4bit_gguf_generates_what_transformers_generates(tiny_gguf, eager, tmp_path, monkeypatch):
    """quant=auto keeps the Q4_0/Q4_1/Q4_K layers 4-bit (no fp32 copy) and, the repack being lossless,
    greedy tokens equal transformers' on the dequantized file: batch-1 decode (one-row kernel), batched
    decode and prefill (dequantize + GEMM), compiled and eager."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    llm = LLM(str(tiny_gguf), dtype="float32", enforce_eager=eager, progress_bar=False)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * TINY["layers"]  # qkv, o, gate_up, down
    assert not (tmp_path / "checkpoints").exists()  # nothing was dequantized to fp32
    ids = [llm.encode(p) for p in PROMPTS]
    want = [trim_at_eos(e, llm.engine.eos_token_ids) for e in hf_greedy(hf.eval(), ids, 12)]
    params = SamplingParams(max_tokens=12, temperature=0)
    assert [o.outputs[0].token_ids for o in llm.generate_outputs(ids[:1], params)] == want[:1]  # batch 1
    assert [o.outputs[0].token_ids for o in llm.generate_outputs(ids, params)] == want


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("quant", ["auto", "int8"])
def test_greedy_output_is_the_same_alone_and_batched(tiny_gguf, eager, quant, tmp_path, monkeypatch):
    """A request's greedy tokens do not depend on what else the batch holds: up to 8 rows a step computes each
    row as a lone row, and (without a fast int8 GEMM) a decode step of more sequences runs as steps of 8."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    llm = LLM(str(tiny_gguf), dtype="float32", enforce_eager=eager, progress_bar=False, quant=quant, cache="none")
    assert llm.engine.runner.decode_step_rows == (None if quant_linear.INT8_GEMM else quant_linear.FEW_ROWS)
    ids = [llm.encode(p) for p in PROMPTS + [p + " and" for p in PROMPTS[:4]]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate_outputs([p], params)[0].outputs[0].token_ids for p in ids]
    for batch in (ids[:3], ids[3:8], ids if not quant_linear.INT8_GEMM else []):
        together = [o.outputs[0].token_ids for o in llm.generate_outputs(batch, params)]
        assert together == [alone[ids.index(p)] for p in batch]


@pytest.mark.parametrize("quant", ["int4", "int8", "int8_groups"])
def test_a_decode_rows_values_do_not_depend_on_the_steps_size(tiny_gguf, quant, tmp_path, monkeypatch):
    """Bit for bit: the same 12 prompts (one prefill step) decoded all together, or with half of them stopping
    after 2 tokens, give the others the same logprobs: 12-row steps run as steps of 8 and 4, each row computed as
    a lone row, like the 6-row steps (with every linear layer quantized: a float GEMM's bits depend on its row
    count). One 12-row GEMM instead gave none of the 6 the same logprobs. One thread: eager ATen splits a
    reduction over threads by its size, so with two the eager attention of a 12-row step (SDPA) and a 6-row one
    differed in the last bits for 2 of the 6 (the compiled decode graph's attention is inductor's)."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _decode_steps_of_either_size(tiny_gguf, quant)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("quant", MODES)
def test_every_quant_mode_serves_a_bfloat16_model(tiny_gguf, quant, tmp_path, monkeypatch):
    """`dtype=auto` is bfloat16 on CPUs with AVX-512 BF16 or AMX, and a quantized model's several-row products
    ran there only by accident: the grouped int8 head's fp32 activations met its bf16 float pieces and every
    step of more than 8 rows failed (`LLM()` with 12 prompts, 2026-12-05). Prefill steps of 12 prompts take the
    several-row paths, decode steps the one-row ones; greedy tokens stay close to the fp32 model's: the first token
    (the prefill's several-row products) nearly always, the continuation for most of its length (this tiny random
    model's near-ties part bf16 from fp32 after a few tokens: on AVX2, where decode steps of 12 rows run as rows
    alone, int4 kept 7 of 12 continuations whole, 12 of 12 first tokens, a mean common prefix of 4.4 of 6; the other
    modes 9-10, 11, 4.3-5.3). The bfloat16 model's int4 layers run in ATen's packed layout (PackedInt4Linear)."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    ids = [[(37 * i + 11 * j) % 200 + 50 for j in range(10)] for i in range(12)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(tiny_gguf), dtype=dtype, enforce_eager=True, progress_bar=False, quant=quant, cache="none")
        packed = sum(isinstance(m, PackedInt4Linear) for m in llm.engine.model.modules())
        assert packed == (4 * TINY["layers"] if dtype == "bfloat16" and quant in ("int4", "auto") else 0)
        outputs[dtype] = [o.outputs[0].token_ids for o in llm.generate_outputs(ids, params)]
        llm.shutdown()
    assert all(len(t) == 6 for t in outputs["bfloat16"])
    pairs = list(zip(outputs["float32"], outputs["bfloat16"]))
    assert sum(a[0] == b[0] for a, b in pairs) >= 10, outputs
    prefixes = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in pairs]
    assert sum(prefixes) / len(prefixes) >= 3.5, (prefixes, outputs)


def _decode_steps_of_either_size(tiny_gguf: Path, quant: str) -> None:
    llm = LLM(str(tiny_gguf), dtype="float32", enforce_eager=True, progress_bar=False, quant=quant, cache="none")
    if llm.engine.runner.decode_step_rows is None:
        pytest.skip("a CPU with a fast int8 GEMM (VNNI) keeps batched decode steps whole")
    ids = [[(37 * i + 11 * j) % 200 + 50 for j in range(10)] for i in range(12)]
    long, short = (SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=True) for n in (8, 2))

    def logprobs(params: list[SamplingParams]) -> list[list[float]]:
        return [[lp for lp, _ in o.outputs[0].logprobs] for o in llm.generate_outputs(ids, params)]

    together, thinned = logprobs([long] * 12), logprobs([long, short] * 6)
    assert [together[i] for i in range(0, 12, 2)] == [thinned[i] for i in range(0, 12, 2)]


def test_quantized_load_is_cached(tiny_gguf, tmp_path, monkeypatch):
    """The first load writes the quantized tensors and the plan to the cache; the second reads them (and
    not the GGUF) and gets the same model."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    first = LLM(str(tiny_gguf), dtype="float32", enforce_eager=True, progress_bar=False).engine.model.state_dict()
    folder = next((tmp_path / f"quantized-auto-v{QUANTIZED_LAYOUT}").glob("tiny-q4-*"))
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["layers.1.mlp.down_proj"] == "int4" and "lm_head" not in plan  # F16 head stays float
    written = (folder / "model.safetensors").stat().st_mtime_ns
    second = LLM(str(tiny_gguf), dtype="float32", enforce_eager=True, progress_bar=False).engine.model.state_dict()
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert gguf_cache_dir(tiny_gguf, f"quantized-auto-v{QUANTIZED_LAYOUT}") == folder


@pytest.mark.parametrize("mode", ["int8", "int8_groups"])
def test_loading_in_pieces_gives_the_model_read_whole(tiny_gguf, tmp_path, monkeypatch, mode):
    """Tensors are converted a few rows at a time (bounded memory): the pieces of a GGUF's rotary-permuted Q/K
    must hold whole heads, and the model must equal one converted tensor by tensor."""
    from engine.quant import base

    states = []
    for piece_bytes in (1 << 30, 3 * 4 * TINY["hidden"]):  # whole tensors; 3 rows, rounded up to whole heads
        monkeypatch.setattr(base, "LOAD_BYTES", piece_bytes)
        monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / str(piece_bytes)))
        llm = LLM(str(tiny_gguf), quant=mode, dtype="float32", enforce_eager=True, progress_bar=False)
        states.append(llm.engine.model.state_dict())
    whole, pieces = states
    assert whole.keys() == pieces.keys() and all(torch.equal(whole[k], pieces[k]) for k in whole)


# ------------------------------------------------------------------------------------- SmolLM2 quality

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()  # ~800 tokens of plain English


def perplexity(llm: LLM) -> float:
    sys.path.insert(0, str(ROOT / "experiments"))
    import workloads

    return workloads.perplexity(llm, TEXT)


@pytest.mark.slow
def test_smollm2_perplexity_int8_within_1pct_int4_within_3pct(tmp_path, monkeypatch):
    """int8 and int4 quantize a float checkpoint (SmolLM2 dequantized and saved as safetensors): the
    perplexity of a fixed text stays within 1% (int8, W8A8) and 3% (int4) of the float model's."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from engine.models import loader
    from engine.models.source import ModelSource

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    path, folder = embedded_model_path(), tmp_path / "smollm2"
    AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    src = ModelSource(path, is_gguf=True)  # transformers will not save a GGUF-loaded model: write it here
    tensors = {name: read((slice(None),)) for name, read in loader._iter_gguf(path, loader.load_config(src))}
    save_file(tensors, str(folder / "model.safetensors"))
    ppl = {}
    for mode in ("none", "int8", "int4"):
        llm = LLM(str(folder), quant=mode, dtype="float32", enforce_eager=True, progress_bar=False)
        ppl[mode] = perplexity(llm)
        del llm
    assert 1 < ppl["none"] < 100, ppl  # a real model on real text
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01, ppl
    assert abs(ppl["int4"] / ppl["none"] - 1) < 0.03, ppl


# What the server's engine process does (the tokenizer loads in the HTTP process): build the engine on the
# embedded SmolLM2 under the default quant=auto. The peak resident memory is reset (Linux: clear_refs) once the
# modules a load imports are in, so what it reports is the load's alone.
LOAD_PEAK = """
import gguf, safetensors.torch, torch, torch.fx.experimental.symbolic_shapes
from engine.config import compose_config
from engine.kv_cache import cache_tensors
from engine.llm_engine import LLMEngine
from engine.models.source import resolve_model
from engine.quant.base import weight_bytes

def resident(key):
    line = next(line for line in open("/proc/self/status") if line.startswith(key))
    return int(line.split()[1]) * 1024

cfg = compose_config(None, "float32", enforce_eager=True, kv_memory_mb=16, progress_bar=False)
source = resolve_model(cfg.model.path)
start = resident("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
engine = LLMEngine(cfg, source)
peak = resident("VmHWM:")
kv = sum(t.nbytes for c in (engine.pool.k, engine.pool.v) for t in cache_tensors(c))
kinds = sorted({type(m).__name__ for m in engine.model.modules() if "Int" in type(m).__name__})
print(repr((peak - start, weight_bytes(engine.model) + kv, kinds)))
"""


@pytest.mark.slow
def test_smollm2_gguf_auto_loads_in_little_memory(tmp_path):
    """The embedded Q4_1 file under the default quant=auto: int4 layers and its Q8_0 head as it is (grouped
    int8), and the peak resident memory of a load within the issue's bound, 1.3x its quantized weights plus its KV
    pool: measured 1.26x for the first load (converting the file: 1.49x while its tensors were read through the
    mapping) and 1.15x once the engine cache has the converted model (mapped by safetensors, 2.0x)."""
    env = {**os.environ, "ENGINE_CACHE_DIR": str(tmp_path)}
    for load in ("first", "cached"):
        done = subprocess.run([sys.executable, "-c", LOAD_PEAK], env=env, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        grown, budget, kinds = eval(done.stdout.strip().splitlines()[-1])
        assert kinds == ["GroupedInt8Embedding", "GroupedInt8Linear", "Int4Linear"]
        assert grown <= 1.3 * budget, (load, grown / budget)


@pytest.mark.parametrize("width", [256, 64], ids=["narrower-checkpoint", "wider-checkpoint"])
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_a_checkpoint_of_the_wrong_shape_is_named(tiny_qwen3, tmp_path, mode, width):
    """Float and quantized loads both name the tensor whose shape disagrees with the config, whether the
    checkpoint is narrower or wider (read in part, a wider one used to load truncated)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_qwen3, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = width  # the checkpoint's MLP is 128 wide
    (bad / "config.json").write_text(json.dumps(cfg))
    named = rf"model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .*128.*expected .*{width}"
    with pytest.raises(ValueError, match=named):
        LLM(str(bad), quant=mode, dtype="float32", enforce_eager=True, progress_bar=False)


@pytest.mark.parametrize("mode", MODES)
def test_the_llama_cpp_benchmark_runs_what_a_plain_llm_gets(mode):
    """experiments/cpu_vs_llamacpp.py measures the engine exactly as `LLM(quant=mode)` builds it (a benchmark
    that differed from the plain path once reported 1.2x llama.cpp where users got 0.17x)."""
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(ROOT / "experiments"))
    from cpu_vs_llamacpp import engine_config

    from engine.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("cpu_vs_llamacpp")
    assert engine_config(cfg, mode) == compose_config(quant=mode)
