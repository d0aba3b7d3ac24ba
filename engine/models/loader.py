"""Load a checkpoint found by `engine.models.source`: its config, then its weights.

Every source is turned into a stream of (Hugging Face parameter name, tensor) pairs; one mapping then
places those into the fused parameters of `CausalLM`. A GGUF file is converted once into safetensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.models.source import ModelSource, gguf_cache_dir
from engine.models.transformer import CausalLM, ModelConfig
from engine.parallel import TPGroup, shard_heads, vocab_shard

# ------------------------------------------------------------------------------------ converted GGUF

CONVERTED_WEIGHTS = "model.safetensors"
CONVERTED_CONFIG = "engine_config.json"


def converted_gguf(gguf_file: Path) -> Path | None:
    """The GGUF's config and dequantized tensors (HF names and layout, fp32 safetensors), converted on first
    use. Parsing the header (it holds the whole vocabulary) and dequantizing took ~8 s of a 10 s SmolLM2
    load; the converted file is memory-mapped in well under a second. None where the cache is not writable."""
    folder = gguf_cache_dir(gguf_file, "checkpoints")
    if (folder / CONVERTED_CONFIG).is_file():
        return folder
    from safetensors.torch import save_file

    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only cache: read the GGUF itself, without dequantizing it for nothing first
        return None
    cfg = _gguf_config(gguf_file)
    tensors = {name: read((slice(None),)).contiguous() for name, read in _iter_gguf(gguf_file, cfg)}
    try:
        save_file(tensors, str(staging / CONVERTED_WEIGHTS))
        (staging / CONVERTED_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg)))
        os.replace(staging, folder)
    except OSError:  # a full disk, or another process (a tensor-parallel rank) renamed its copy first
        shutil.rmtree(staging, ignore_errors=True)
    return folder if (folder / CONVERTED_CONFIG).is_file() else None


# ---------------------------------------------------------------------------------------------- config


def load_config(src: ModelSource) -> ModelConfig:
    if src.is_gguf:
        converted = converted_gguf(src.path)
        if converted is None:
            return _gguf_config(src.path)
        return ModelConfig(**json.loads((converted / CONVERTED_CONFIG).read_text()))
    cfg = ModelConfig.from_hf(json.loads((src.path / "config.json").read_text()))
    gen = src.path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set([eos] if isinstance(eos, int) else eos))
    return cfg


def _gguf_config(path: Path) -> ModelConfig:
    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path}")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(embd.shape[1]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
        eos_token_ids=[] if eos is None else [int(eos)],
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
    )


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: Path):
    # Parsing the header (it holds the whole vocabulary) takes seconds: config and weights share one.
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return int(value) if isinstance(value, (int,)) and not isinstance(value, bool) else value


# --------------------------------------------------------------------------------------------- weights

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# Reads this rank's part of one checkpoint tensor: part[0] indexes rows, part[1:] the other dims.
PartReader = Callable[[tuple[slice, ...]], torch.Tensor]


def iter_checkpoint(src: ModelSource, cfg: ModelConfig) -> Iterator[tuple[str, PartReader]]:
    """(HF name, reader of a part of it) pairs, whatever the file format. Readers touch only the rows
    asked for where the format allows, so a tensor-parallel rank does not materialise whole matrices."""
    folder = converted_gguf(src.path) if src.is_gguf else src.path
    if folder is None:
        yield from _iter_gguf(src.path, cfg)
        return
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_slice(name)
                yield name, lambda part, tensor=tensor: tensor[part[: len(tensor.get_shape())]]


def _iter_gguf(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, PartReader]]:
    import gguf

    for t in _gguf_reader(path).tensors:
        stem, kind = t.name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part not in _GGUF_NAMES:
                continue
            name = f"model.layers.{layer}.{_GGUF_NAMES[part]}.{kind}"
        elif stem in _GGUF_TOP:
            name = f"{_GGUF_TOP[stem]}.{kind}"
        else:
            continue
        permuted = cfg.architecture == "llama" and stem.endswith(("attn_q", "attn_k"))

        def read(part: tuple[slice, ...], t=t, permuted=permuted) -> torch.Tensor:
            # Quantized blocks run along a row, so whole rows dequantize on their own.
            w = torch.from_numpy(gguf.dequantize(t.data[part[0]], t.tensor_type).copy())
            if permuted:  # rows are sliced by whole heads, and the permutation stays inside a head
                w = _undo_llama_cpp_permute(w, w.shape[0] // cfg.head_dim)
            return w[(slice(None),) + part[1 : w.dim()]]

        yield name, read


def _undo_llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of every head (GPT-J layout); HF rotates halves.
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _placement(name: str, cfg: ModelConfig, tp: TPGroup) -> tuple[str, slice | None, tuple[slice, ...]] | None:
    """Where a HF tensor goes: (our parameter, its rows to fill or None for all, this rank's part of the
    checkpoint tensor), or None to skip it."""
    name = name.removeprefix("model.")
    if (name == "lm_head.weight" and cfg.tie_word_embeddings) or "rotary_emb" in name:
        return None
    d = cfg.head_dim
    heads = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp.size, tp.rank)
    q, kv = heads.q_heads * d, heads.kv_heads * d
    q_rows = slice(heads.q_start * d, heads.q_start * d + q)
    kv_rows = slice(heads.kv_start * d, heads.kv_start * d + kv)
    width = cfg.intermediate_size // tp.size
    mlp_rows = slice(tp.rank * width, (tp.rank + 1) * width)
    start, rows = vocab_shard(cfg.vocab_size, tp.size, tp.rank)
    vocab = slice(start, min(start + rows, cfg.vocab_size))
    everything = slice(None)
    rules = {  # checkpoint module -> (our module, destination rows, source index)
        "self_attn.q_proj": ("self_attn.qkv_proj", slice(0, q), (q_rows,)),
        "self_attn.k_proj": ("self_attn.qkv_proj", slice(q, q + kv), (kv_rows,)),
        "self_attn.v_proj": ("self_attn.qkv_proj", slice(q + kv, q + 2 * kv), (kv_rows,)),
        "self_attn.o_proj": ("self_attn.o_proj", None, (everything, q_rows)),
        "mlp.gate_proj": ("mlp.gate_up_proj", slice(0, width), (mlp_rows,)),
        "mlp.up_proj": ("mlp.gate_up_proj", slice(width, 2 * width), (mlp_rows,)),
        "mlp.down_proj": ("mlp.down_proj", None, (everything, mlp_rows)),
        "embed_tokens": ("embed_tokens", slice(0, vocab.stop - vocab.start), (vocab,)),
        "lm_head": ("lm_head", slice(0, vocab.stop - vocab.start), (vocab,)),
    }
    for old, (new, dest, src) in rules.items():
        if name.startswith(old + ".") or f".{old}." in name:
            return name.replace(old, new, 1), dest, src
    return name, None, (everything,)


def load_weights(model: CausalLM, src: ModelSource) -> None:
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, read in iter_checkpoint(src, model.config):
        place = _placement(name, model.config, model.tp)
        if place is None:
            continue
        target, rows, part = place
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the {model.config.architecture} model")
        dest = params[target].data if rows is None else params[target].data[rows]
        tensor = read(part)
        if dest.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)} for this rank, "
                f"expected {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        seen.add(target)
    missing = {n for n in params if n not in seen and not (n == "lm_head.weight" and model.config.tie_word_embeddings)}
    if missing:
        raise ValueError(f"checkpoint {src.path} lacks {sorted(missing)[:5]}")


def build_model(
    src: ModelSource, cfg: ModelConfig, backend, dtype: torch.dtype, device: torch.device, tp: TPGroup = TPGroup()
) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg, backend, tp)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.zero_()  # vocab padding rows of a sharded embedding are never loaded
    model.tie_weights()
    model.rope.build_table()  # not in the checkpoint: computed, and meta tensors hold no values
    load_weights(model, src)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
