"""Every supported family against transformers, as tiny random checkpoints built with transformers' own config
classes: Llama-3 (llama3 RoPE scaling), Qwen2 (QKV bias), Mistral (a sliding window on every layer), Phi-3
(fused checkpoint tensors, longrope, partial rotary), Gemma 3 (sliding and full layers, per-type RoPE, sandwich
norms, softmax scale of its own) and Qwen3-MoE (routed experts next to a dense layer); and hub ids from the
local cache. Windows are 8 tokens and prompts up to ~90, so the window slides in prefill, in chunked prefill
and in decode."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPTS, hf_greedy, save_checkpoint, trim_at_eos

from engine import LLM
from engine.models.source import resolve_model

# What every tiny random family shares (the real Qwen3 tokenizer's vocabulary; big weights keep greedy choices
# away from near-ties).
TINY = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_attention_heads=4, initializer_range=0.5)


def tiny_llama3(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        initializer_range=0.5,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    torch.manual_seed(1)
    return save_checkpoint(LlamaForCausalLM(cfg).eval(), path)


def tiny_qwen2(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        **TINY,
        num_hidden_layers=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random non-zero biases, so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return save_checkpoint(model, path)


def tiny_mistral(path, sliding_window=8):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        **TINY,
        num_hidden_layers=2,
        num_key_value_heads=2,
        sliding_window=sliding_window,
        max_position_embeddings=1024,
    )
    torch.manual_seed(4)
    return save_checkpoint(MistralForCausalLM(cfg).eval(), path)


def tiny_phi3(path):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        **TINY,
        num_hidden_layers=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        original_max_position_embeddings=1024,  # longrope's attention factor: sqrt(1 + ln 4 / ln 1024)
        pad_token_id=0,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.2 * i for i in range(6)],
            "long_factor": [3.0 + 0.2 * i for i in range(6)],
            "partial_rotary_factor": 0.75,  # 12 of 16 dims rotate
        },
    )
    torch.manual_seed(5)
    return save_checkpoint(Phi3ForCausalLM(cfg).eval(), path)


def tiny_gemma3(path, sliding_window=8):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        **TINY,
        num_hidden_layers=3,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,  # not head_dim: the softmax scale must come from it
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        },
    )
    torch.manual_seed(3)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # (1 + w) norms start at w = 0: random w, so a dropped or misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
        # Scaled by sqrt(hidden), embeddings as large as the rest would drown what attention adds (the window
        # would not change a greedy token); the untied head keeps the logits peaked.
        model.model.embed_tokens.weight.mul_(0.1)
    return save_checkpoint(model, path)


def tiny_qwen3_moe(path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **TINY,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],  # layer 1 dense, 0 and 2 routed
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    torch.manual_seed(6)
    return save_checkpoint(Qwen3MoeForCausalLM(cfg).eval(), path)


FAMILIES = {
    "llama3": tiny_llama3,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "phi3": tiny_phi3,
    "gemma3": tiny_gemma3,
    "qwen3_moe": tiny_qwen3_moe,
}
CONFIGS = {
    "eager": dict(enforce_eager=True),
    "chunked-prefill-7": dict(enforce_eager=True, max_num_batched_tokens=7),
    "flex": dict(enforce_eager=True, attention="flex"),
    "no-prefix-cache": dict(enforce_eager=True, cache="none"),
    # ~100 tokens of KV per sequence at page size 4 -> 30 pages hold one or two at a time.
    "preempting": dict(enforce_eager=True, page_size=4, num_pages=30, max_num_batched_tokens=64),
    "compiled": dict(max_num_batched_tokens=32),
    "compiled-regional": {"max_num_batched_tokens": 32, "compile.regional": True},
}
# Gemma 3's sliding layers keep only their window (engine/kv_cache.py): the same memory holds more sequences.
SMALLER_POOL = {"gemma3": dict(num_pages=24)}
# Compiled runs take a minute each: the families whose compiled code differs (windows, experts).
COMPILED_FAMILIES = {"mistral", "gemma3", "qwen3_moe"}
MATRIX = [
    pytest.param(f, c, marks=[pytest.mark.slow] if c.startswith("compiled") else [], id=f"{f}-{c}")
    for f in FAMILIES
    for c in CONFIGS
    if not c.startswith("compiled") or f in COMPILED_FAMILIES
]


def _prompts(llm) -> list[list[int]]:
    # Long prompts push positions past the llama3 scaling's original context (64) and past every window.
    return [llm.encode(p * 4) for p in PROMPTS[:5]] + [llm.encode(p) for p in PROMPTS[5:]]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """(checkpoint, transformers' greedy continuations of the prompts), built once per family."""
    from transformers import AutoModelForCausalLM

    name = request.param
    path = FAMILIES[name](tmp_path_factory.mktemp(name))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype=torch.float32, enforce_eager=True, progress_bar=False)
    ids = _prompts(llm)
    return path, ids, hf_greedy(hf, ids, MAX_NEW), hf


MAX_NEW = 10


@pytest.mark.parametrize(("family", "config"), MATRIX, indirect=["family"])
def test_family_matches_transformers(family, config, device):
    path, ids, expected, _ = family
    smaller = [pool for name, pool in SMALLER_POOL.items() if path.name.startswith(name)]  # tmp dirs: "gemma30"
    options = CONFIGS[config] | (smaller[0] if smaller and config == "preempting" else {})
    llm = LLM(str(path), dtype=torch.float32, progress_bar=False, device=device, **options)
    eos = llm.engine.eos_token_ids
    for attempt in range(2):  # the second pass finds every prompt in the prefix cache (unless it is off)
        outs = llm.generate_outputs(ids, max_tokens=MAX_NEW, temperature=0)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == [trim_at_eos(e, eos) for e in expected], f"{config}, pass {attempt}"
    stats = llm.engine.stats()
    # Fractions of a page where the windowed layers page apart (engine/kv_cache.py).
    assert stats["kv_pages_free"] + stats["kv_pages_evictable"] == pytest.approx(stats["kv_pages_total"]), "KV leaked"
    if config == "preempting":
        assert stats["preemptions"] > 0, "the pool was meant to be too small for the batch"
    if config in ("eager", "compiled"):
        assert sum(o.usage.cached_tokens for o in outs) > 0


@pytest.mark.parametrize("family", ["mistral", "gemma3"], indirect=True)
def test_the_window_changes_the_reference(family):
    """The windowed families' references would differ without the window: the matrix above tests the window."""
    from transformers import AutoModelForCausalLM

    path, ids, expected, _ = family
    unwindowed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=4096).eval()
    assert hf_greedy(unwindowed, ids, MAX_NEW) != expected


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_family_logprobs_match_transformers(family):
    path, ids, _, hf = family
    llm = LLM(str(path), dtype=torch.float32, enforce_eager=True, progress_bar=False)
    outs = llm.generate_outputs(ids[:4], max_tokens=1, temperature=0, logprobs=True, top_logprobs=3)
    for prompt, out in zip(ids[:4], outs):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
        lp, top = out.outputs[0].logprobs[0]
        assert abs(lp - ref[out.outputs[0].token_ids[0]].item()) < 1e-3
        assert [t for t, _ in top] == ref.topk(3).indices.tolist()


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*gemma3_text"):
        LLM(str(tmp_path), enforce_eager=True, progress_bar=False)


def test_hub_id_resolves_from_local_cache_without_network(tiny_qwen3, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "models--acme--tiny-qwen3" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_qwen3, snapshot)
    (tmp_path / "models--acme--tiny-qwen3" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/tiny-qwen3").path == snapshot
    with pytest.raises(FileNotFoundError, match="acme/not-cached"):
        resolve_model("acme/not-cached")


def write_qwen3_moe_gguf(model, path, experts_type=None):
    """The HF model as an F32 `qwen3moe` GGUF, laid out as llama.cpp's converter writes one (stacked expert
    tensors, the router as ffn_gate_inp), with SmolLM2's tokenizer; `experts_type` quantizes the experts."""
    import gguf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from gguf_files import QWEN3_LAYER_NAMES, add_qwen3_config

    def add_experts(name, values):
        if experts_type is None:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, experts_type), raw_dtype=experts_type)

    cfg, state = model.config, {k: v.float().numpy() for k, v in model.state_dict().items()}
    w = _gguf_with_smollm2_tokenizer(path, "qwen3moe")
    add_qwen3_config(w, cfg)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    names = QWEN3_LAYER_NAMES | {"mlp.gate": "ffn_gate_inp"}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    width = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", state[f"model.layers.{i}.{hf}.weight"])
        gate_up = state[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        add_experts(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :width].copy())
        add_experts(f"blk.{i}.ffn_up_exps.weight", gate_up[:, width:].copy())
        add_experts(f"blk.{i}.ffn_down_exps.weight", state[f"model.layers.{i}.mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_moe_hf():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=49152,  # SmolLM2's tokenizer
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    return Qwen3MoeForCausalLM(cfg).eval()


def test_qwen3_moe_gguf_matches_transformers(tmp_path, monkeypatch):
    """A `qwen3moe` GGUF (every layer routed, top-k renormalised, as llama.cpp runs it) generates what
    transformers generates from the same weights."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    hf = _tiny_moe_hf()
    path = write_qwen3_moe_gguf(hf, tmp_path / "tiny-moe.gguf")
    llm = LLM(str(path), quant="none", dtype=torch.float32, enforce_eager=True, progress_bar=False)
    assert llm.engine.model.config.moe_layers == [0, 1]
    ids = [llm.encode(p * 3) for p in PROMPTS[:5]]
    expected = hf_greedy(hf, ids, MAX_NEW)
    outs = llm.generate_outputs(ids, max_tokens=MAX_NEW, temperature=0)
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, llm.engine.eos_token_ids) for e in expected]


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_quantized_experts_keep_the_files_blocks(tmp_path, monkeypatch, eager):
    """quant=auto on a GGUF with Q8_0 experts keeps them as the file's blocks (grouped int8, a quarter of the
    float bytes, bit-exact) and generates what transformers generates from those values."""
    import gguf

    from engine.kernels.quant_linear import GroupedInt8Experts

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    hf = _tiny_moe_hf()
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    path = write_qwen3_moe_gguf(hf, tmp_path / "tiny-moe-q8.gguf", experts_type=q8_0)
    llm = LLM(str(path), dtype=torch.float32, enforce_eager=eager, progress_bar=False)  # quant=auto
    for i, layer in enumerate(llm.engine.model.layers):
        for ours, theirs in (("experts_gate_up", "gate_up_proj"), ("experts_down", "down_proj")):
            experts = getattr(layer.mlp, ours)
            assert isinstance(experts, GroupedInt8Experts) and experts.qweight.dtype == torch.int8
            held = torch.stack([experts.expert(e) for e in range(experts.weight_shape[0])])
            original = getattr(hf.model.layers[i].mlp.experts, theirs).data
            file = torch.from_numpy(gguf.dequantize(gguf.quants.quantize(original.numpy(), q8_0), q8_0))
            assert torch.equal(held, file)  # the file's values, bit for bit
            getattr(hf.model.layers[i].mlp.experts, theirs).data = held
    ids = [llm.encode(p * 3) for p in PROMPTS[:5]]
    expected = hf_greedy(hf, ids, MAX_NEW)
    outs = llm.generate_outputs(ids, max_tokens=MAX_NEW, temperature=0)
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, llm.engine.eos_token_ids) for e in expected]


def _gguf_with_smollm2_tokenizer(path, arch):
    import gguf

    from engine.models.source import embedded_model_path

    w = gguf.GGUFWriter(str(path), arch)
    for field in gguf.GGUFReader(str(embedded_model_path())).fields.values():
        if field.name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), kind, sub)
    return w


def test_phi3_gguf_matches_transformers(tmp_path, monkeypatch):
    """A `phi3` GGUF as llama.cpp's converter writes one: Q/K/V and gate/up fused, longrope's factors as
    tensors, the rotary dims and the sliding window as keys."""
    from transformers import Phi3Config, Phi3ForCausalLM

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    short, long = [1.0 + 0.2 * i for i in range(6)], [3.0 + 0.2 * i for i in range(6)]
    cfg = Phi3Config(
        vocab_size=49152,  # SmolLM2's tokenizer
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        original_max_position_embeddings=1024,
        sliding_window=8,
        initializer_range=0.5,
        pad_token_id=0,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": short,
            "long_factor": long,
            "partial_rotary_factor": 0.75,
        },
    )
    torch.manual_seed(8)
    hf = Phi3ForCausalLM(cfg).eval()
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    w = _gguf_with_smollm2_tokenizer(tmp_path / "tiny-phi3.gguf", "phi3")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(12)
    w.add_rope_scaling_orig_ctx_len(1024)
    w.add_sliding_window(8)
    w.add_tensor("rope_factors_short.weight", np.array(short, np.float32))
    w.add_tensor("rope_factors_long.weight", np.array(long, np.float32))
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up"}
    names |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", state[f"model.layers.{i}.{ours}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    llm = LLM(
        str(tmp_path / "tiny-phi3.gguf"), quant="none", dtype=torch.float32, enforce_eager=True, progress_bar=False
    )
    assert llm.engine.model.config.windows() == (8,)
    ids = [llm.encode(p * 3) for p in PROMPTS[:5]]
    expected = hf_greedy(hf, ids, MAX_NEW)
    outs = llm.generate_outputs(ids, max_tokens=MAX_NEW, temperature=0)
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, llm.engine.eos_token_ids) for e in expected]
