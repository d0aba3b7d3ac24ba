"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_greedy, trim_at_eos

from engine import LLM, SamplingParams
from engine.models.source import embedded_model_path

pytestmark = pytest.mark.slow
MAX_NEW = 16


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2():
    # No path: the embedded model, compiled decode; dequantized (quant=none), as transformers loads it.
    return LLM(dtype=torch.float32, quant="none", progress_bar=False)


def test_default_model_is_embedded_smollm2(smollm2):
    assert smollm2.config.model.path is None  # the default config names no checkpoint: the embedded one
    mc = smollm2.engine.model_config
    assert (mc.architecture, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.vocab_size) == ("llama", 30, 9, 3, 49152)
    assert mc.tie_word_embeddings


def test_greedy_matches_transformers(smollm2, hf_smollm2):
    ids = [smollm2.encode(p) for p in PROMPTS]
    expected = hf_greedy(hf_smollm2, ids, MAX_NEW)
    outs = smollm2.generate_outputs(ids, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    eos = smollm2.engine.eos_token_ids
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, eos) for e in expected]
    assert outs[1].outputs[0].text.startswith(" Paris")


def test_logprobs_match_transformers(smollm2, hf_smollm2):
    ids = smollm2.encode(PROMPTS[3])
    (out,) = smollm2.generate_outputs(
        [ids], SamplingParams(max_tokens=1, temperature=0, logprobs=True, prompt_logprobs=0)
    )
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    got = torch.tensor([lp for lp, _ in out.prompt_logprobs[1:]])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(got, want, atol=1e-3)
    assert abs(out.outputs[0].logprobs[0][0] - ref[-1].max().item()) < 1e-3


def test_chat_template(smollm2):
    (out,) = smollm2.chat_outputs(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0
    )
    assert "Paris" in out.outputs[0].text
    assert out.usage.prompt_tokens > 20  # the template added its system prompt and role markers


def test_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    """The first float load (quant=none) dequantizes the GGUF into safetensors under ENGINE_CACHE_DIR;
    later loads read those and get the same config and tensors as reading the GGUF itself. The entries
    are keyed by content."""
    import os
    import shutil

    from engine.models import loader
    from engine.models.source import ModelSource, gguf_cache_dir

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(embedded_model_path(), path)
    src = ModelSource(path, is_gguf=True)
    cfg = loader.load_config(src)
    assert cfg == loader._gguf_config(path) and (gguf_cache_dir(path, "configs") / "config.json").is_file()
    folder = gguf_cache_dir(path, "checkpoints")
    weights = folder / loader.CONVERTED_WEIGHTS
    assert not weights.exists()  # reading the config converts nothing
    cached = dict(loader.iter_checkpoint(src, cfg))
    assert weights.is_file()
    written = weights.stat().st_mtime_ns

    direct = dict(loader._iter_gguf(path, cfg))
    assert cached.keys() == direct.keys()
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ):
        part = (slice(64, 192),)  # whole heads' rows, as a tensor-parallel rank reads them
        assert torch.equal(cached[name](part), direct[name](part)), name
    dict(loader.iter_checkpoint(src, cfg))
    assert loader.load_config(src) == cfg and weights.stat().st_mtime_ns == written  # read, not converted again

    # Keyed by content: another copy of the same file (another virtual environment) shares the entry...
    os.utime(path, ns=(written, written + 10**9))
    copy = tmp_path / "venv2" / "model.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert gguf_cache_dir(path, "checkpoints") == gguf_cache_dir(copy, "checkpoints") == folder
    # ... and a changed file gets its own.
    with open(copy, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    assert gguf_cache_dir(copy, "checkpoints") != folder
