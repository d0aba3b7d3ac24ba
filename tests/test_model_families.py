"""Llama-3 (with llama3 RoPE scaling) and Qwen2 (QKV bias) checkpoints, and hub ids from the local cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import PROMPTS, hf_greedy, qwen_tokenizer_dir, trim_at_eos

from engine import LLM
from engine.models.source import resolve_model


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    for f in qwen_tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    return path


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
    return _save(LlamaForCausalLM(cfg).eval(), path)


def tiny_qwen2(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random non-zero biases, so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return _save(model, path)


@pytest.mark.parametrize("build", [tiny_llama3, tiny_qwen2], ids=["llama3", "qwen2"])
def test_family_matches_transformers(build, tmp_path):
    from transformers import AutoModelForCausalLM

    path = build(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype=torch.float32, enforce_eager=True, progress_bar=False)
    # Long prompts push positions past the llama3 scaling's original context (64).
    ids = [llm.encode(p * 4) for p in PROMPTS[:4]]
    expected = hf_greedy(hf, ids, 10)
    outs = llm.generate_outputs(ids, max_tokens=10, temperature=0)
    eos = llm.engine.eos_token_ids
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, eos) for e in expected]


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
