"""Load a checkpoint found by `engine.models.source`: its config, then its weights.

Every source is turned into a stream of (Hugging Face parameter name, tensor) pairs; one mapping then
places those into the fused parameters of `CausalLM`, tensor by tensor. Layers planned quantized
(engine/quant/) quantize each tensor as it arrives, or take a GGUF's 4-bit blocks as they are,
so no whole float copy of the model ever exists. What a GGUF load produced is kept in the engine cache:
the dequantized safetensors for `quant=none`, the quantized model's tensors for the other modes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.models.gguf_index import GGUFIndex, GGUFTensorInfo
from engine.models.source import ModelSource, gguf_cache_dir
from engine.models.transformer import FULL, SLIDING, CausalLM, ExpertWeights, ModelConfig
from engine.parallel import TPGroup, shard_heads, vocab_shard
from engine.progress import progress
from engine.quant.base import NoQuant, QuantScheme, format_of, quantize_modules, weight_bytes
from engine.quant.int4 import int4_groups, pack_for_dtype
from engine.quant.int8_groups import int8_groups

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ converted GGUF

CONVERTED_WEIGHTS = "model.safetensors"
QUANTIZED_PLAN = "plan.json"
QUANTIZED_LAYOUT = 5  # bump when what the buffers hold changes (kernels/quant_linear.py, a type loaded exactly)


def converted_gguf(gguf_file: Path, cfg: ModelConfig) -> Path | None:
    """The GGUF's dequantized tensors (HF names and layout, fp32 safetensors), converted on first use.
    Parsing the header (it holds the whole vocabulary) and dequantizing took ~8 s of a 10 s SmolLM2
    load; the converted file is memory-mapped in well under a second. None where the cache is not writable."""
    folder = gguf_cache_dir(gguf_file, "checkpoints")
    if (folder / CONVERTED_WEIGHTS).is_file():
        return folder
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        tensors = {name: read((slice(None),)).contiguous() for name, read in _iter_gguf(gguf_file, cfg)}
        save_file(tensors, str(staging / CONVERTED_WEIGHTS))

    return _publish(folder, write)


def _publish(folder: Path, write: Callable[[Path], None]) -> Path | None:
    """Write a cache entry into a staging folder and rename it into place: readers see all or nothing.
    None where the cache is not writable (a read-only cache, a full disk)."""
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        write(staging)
        os.replace(staging, folder)
    except OSError:  # also: another process (a tensor-parallel rank) renamed its copy first
        shutil.rmtree(staging, ignore_errors=True)
    return folder if folder.is_dir() else None


# ---------------------------------------------------------------------------------------------- config


def load_config(src: ModelSource) -> ModelConfig:
    if src.is_gguf:
        return _cached_gguf_config(src.path)
    cfg = ModelConfig.from_hf(json.loads((src.path / "config.json").read_text()))
    gen = src.path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set([eos] if isinstance(eos, int) else eos))
    return cfg


def _cached_gguf_config(path: Path) -> ModelConfig:
    # Reading the config means parsing the whole header (seconds, for the vocabulary): done once per file.
    file = gguf_cache_dir(path, "configs") / "config.json"
    if file.is_file():
        return ModelConfig(**json.loads(file.read_text()))
    with progress(log, f"reading the GGUF header of {path.name} (once per file)"):
        cfg = _gguf_config(path)
    _publish(file.parent, lambda staging: (staging / file.name).write_text(json.dumps(dataclasses.asdict(cfg))))
    return cfg


GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "phi3": "phi3",
    "gemma3": "gemma3_text",
}
# Gemma 3 where its GGUF does not say: every sixth layer attends to the whole context, the others to the
# window, and the sliding layers rotate with base 10000 (llama.cpp's defaults, and transformers').
GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_ROPE_BASE = 6, 10000.0


def _gguf_config(path: Path) -> ModelConfig:
    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path}: supported are {', '.join(GGUF_ARCHITECTURES)} "
            "(see the README's supported-models table)"
        )
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    eos = [_field(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
    gemma = arch == "gemma3"
    layers = get("block_count")
    window = get("attention.sliding_window") if arch in ("gemma3", "phi3") else None  # others: never windowed
    factor = get("rope.scaling.factor")
    experts = get("expert_count", 0) if arch == "qwen3moe" else 0
    head_dim = get("attention.key_length", hidden // heads)
    rotary = get("rope.dimension_count", head_dim)
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(embd.shape[1]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
        rope_scaling=_longrope(reader, get) or (_linear(factor) if factor and factor != 1 else None),
        eos_token_ids=sorted({int(e) for e in eos if e is not None} | _end_of_turn(reader, arch)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        partial_rotary_factor=rotary / head_dim,
        sliding_window=window,
        layer_types=_layer_types(get("attention.sliding_window_pattern"), layers) if gemma else None,
        gemma=gemma,
        query_pre_attn_scalar=get("attention.key_length") if gemma else None,
        rope_local_theta=float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)) if gemma else None,
        # llama.cpp's qwen3moe: every layer routed, the top-k weights renormalised (Qwen3-MoE's own setting).
        num_experts=experts,
        num_experts_per_tok=get("expert_used_count", 0) if experts else 0,
        moe_intermediate_size=get("expert_feed_forward_length", 0) if experts else 0,
        norm_topk_prob=bool(get("expert_weights_norm", True)) if experts else False,
        moe_layers=list(range(layers)) if experts else [],
    )


def _linear(factor: float) -> dict[str, Any]:
    return {"rope_type": "linear", "factor": float(factor)}


def _layer_types(pattern: int | list[bool] | None, layers: int) -> list[str]:
    """Gemma 3's layer kinds from the file's pattern: a period (every n-th layer global) or, in newer files, a
    flag per layer (True: sliding); absent, llama.cpp's period of 6."""
    if isinstance(pattern, list):
        return [SLIDING if sliding else FULL for sliding in pattern]
    period = pattern or GEMMA3_GLOBAL_EVERY
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(layers)]


def _longrope(reader: GGUFIndex, get: Callable[..., Any]) -> dict[str, Any] | None:
    """Phi-3's longrope scaling: llama.cpp keeps its factors as tensors, its other numbers as keys."""
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if not factors:
        return None
    scaling = {
        "rope_type": "longrope",
        "short_factor": [float(x) for x in factors["rope_factors_short.weight"].data],
        "long_factor": [float(x) for x in factors["rope_factors_long.weight"].data],
        "original_max_position_embeddings": get("rope.scaling.original_context_length"),
    }
    attention = get("rope.scaling.attn_factor")
    return scaling if attention is None else {**scaling, "attention_factor": float(attention)}


def _end_of_turn(reader: GGUFIndex, arch: str) -> set[int]:
    """Gemma ends a chat turn with <end_of_turn>, which its GGUFs do not list as EOS (transformers' generation
    config for Gemma 3 does)."""
    if arch != "gemma3":
        return set()
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    return {tokens.index("<end_of_turn>")} if "<end_of_turn>" in tokens else set()


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: Path) -> GGUFIndex:
    # The config, the quantization plan and the weights of one load share one parse (SmolLM2: 0.13 s, Gemma
    # 3's 262k-entry vocabulary 0.28 s); `build_model` lets it go.
    return GGUFIndex(path)


def _field(reader: GGUFIndex, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


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
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_exps",
    "ffn_up_exps": "mlp.experts.up_exps",
    "ffn_down_exps": "mlp.experts.down_exps",
}
# Gemma 3 norms around attention and the MLP ("sandwich"); its ffn_norm is the norm before the MLP.
_GGUF_GEMMA_NAMES = {
    **_GGUF_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps Q/K/V and gate/up fused (`_unfused` splits them like the HF checkpoint's).
_GGUF_PHI3_NAMES = {**_GGUF_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# Reads this rank's part of one checkpoint tensor: part[0] indexes rows, part[1:] the other dims.
PartReader = Callable[[tuple[slice, ...]], torch.Tensor]


def iter_checkpoint(src: ModelSource, cfg: ModelConfig, convert: bool = True) -> Iterator[tuple[str, PartReader]]:
    """(HF name, reader of a part of it) pairs, whatever the file format. Readers touch only the rows
    asked for where the format allows, so a tensor-parallel rank does not materialise whole matrices.
    A GGUF is read through its dequantized copy in the cache unless `convert` is off (quantized loads
    read the blocks themselves)."""
    folder = src.path
    if src.is_gguf:
        folder = converted_gguf(src.path, cfg) if convert else None
    if folder is None:
        yield from _iter_gguf(src.path, cfg)
        return
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, SafetensorsTensor(f.get_slice(name))


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor:
    """A PartReader of one safetensors tensor: only the part asked for is read."""

    tensor: Any  # safetensors' slice

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.get_shape())

    def __call__(self, part: tuple[slice, ...]) -> torch.Tensor:
        return self.tensor[part[: len(self.shape)]]


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """A PartReader of one GGUF tensor (dequantized rows), which also hands out 4-bit blocks as they are."""

    tensor: GGUFTensorInfo
    head_dim: int
    permuted: bool  # llama.cpp's rotary row order (Q and K of llama models)
    path: Path  # the file
    shift: float = 0.0  # added to the values: llama.cpp stores Gemma's norm weights as 1 + w

    @property
    def type_name(self) -> str:
        return self.tensor.tensor_type.name

    @property
    def row_block(self) -> int:
        """Rows that must be read together: the rotary permutation stays inside one head's rows."""
        return self.head_dim if self.permuted else 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensor.shape))  # GGUF lists the fastest dimension first

    def __call__(self, part: tuple[slice, ...]) -> torch.Tensor:
        import gguf

        # Quantized blocks run along a row, so whole rows dequantize on their own.
        w = torch.from_numpy(self._converted(part[0], lambda b: gguf.dequantize(b, self.tensor.tensor_type)))
        return self._rows_in_hf_order(w + self.shift if self.shift else w)[(slice(None),) + part[1 : w.dim()]]

    def int4_groups(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, scales, offsets) of whole rows of a Q4_0/Q4_1/Q4_K tensor, without loss."""
        return tuple(self._rows_in_hf_order(t) for t in self._converted(rows, lambda b: int4_groups(b, self.type_name)))

    def int8_groups(self, rows: slice, tensor_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, scales) of whole rows of a Q8_0/Q5_0/Q4_0 tensor, without loss."""
        return tuple(self._rows_in_hf_order(t) for t in self._converted(rows, lambda b: int8_groups(b, tensor_type)))

    def _converted(self, rows: slice, convert: Callable[[np.ndarray], Any]) -> Any:
        """`convert` of the bytes of `rows`, read from the file rather than through its mapping: mapped pages
        stay resident until given back, and the kernel maps the neighbours of each page read (fault-around), so
        handing back each piece's own pages still left 25 MB of SmolLM2's file resident at a first load's peak."""
        data = self.tensor.data
        first, last, _ = rows.indices(data.shape[0])
        with open(self.path, "rb") as f:
            f.seek(self.tensor.data_offset + first * data.strides[0])
            piece = bytearray((last - first) * data.strides[0])  # writable: F32 rows are used as they are
            f.readinto(piece)
        return convert(np.frombuffer(piece, data.dtype).reshape(last - first, *data.shape[1:]))

    def _rows_in_hf_order(self, w: torch.Tensor) -> torch.Tensor:
        # Rows are sliced by whole heads, and the permutation stays inside a head.
        return _undo_llama_cpp_permute(w, w.shape[0] // self.head_dim) if self.permuted else w


def _iter_gguf(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, GGUFTensor]]:
    reader = _gguf_reader(path)
    for t in reader.tensors:
        names = {"gemma3_text": _GGUF_GEMMA_NAMES, "phi3": _GGUF_PHI3_NAMES}.get(cfg.architecture, _GGUF_NAMES)
        name = _hf_name(t.name, names)
        if name is not None:
            permuted = cfg.architecture == "llama" and t.name.rsplit(".", 1)[0].endswith(("attn_q", "attn_k"))
            shift = -1.0 if cfg.gemma and t.name.endswith("norm.weight") else 0.0
            yield name, GGUFTensor(t, cfg.head_dim, permuted, path, shift)


def _hf_name(gguf_name: str, names: dict[str, str]) -> str | None:
    stem, kind = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{names[part]}.{kind}" if part in names else None
    return f"{_GGUF_TOP[stem]}.{kind}" if stem in _GGUF_TOP else None


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
    if ".mlp.experts." in name:
        return _expert_placement(name, cfg)
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


def _expert_placement(name: str, cfg: ModelConfig) -> tuple[str, Any, tuple[slice, ...]]:
    """Qwen3-MoE experts into the stacked [experts, out, in] parameters, from per-expert tensors
    (`mlp.experts.E.gate_proj.weight`, the published checkpoints), already stacked ones (transformers 5) or a
    GGUF's stacked gate, up and down (`ffn_*_exps`)."""
    prefix, rest = name.split(".mlp.experts.", 1)
    width, everything = cfg.moe_intermediate_size, slice(None)
    if rest in ("gate_up_proj", "down_proj"):
        return f"{prefix}.mlp.experts_{rest.removesuffix('_proj')}.weight", None, (everything,)
    stacked = {"gate_exps.weight": slice(0, width), "up_exps.weight": slice(width, 2 * width)}
    if rest in stacked:
        return f"{prefix}.mlp.experts_gate_up.weight", (everything, stacked[rest]), (everything,)
    if rest == "down_exps.weight":
        return f"{prefix}.mlp.experts_down.weight", None, (everything,)
    expert, proj, _ = rest.split(".")
    rows = {"gate_proj": slice(0, width), "up_proj": slice(width, 2 * width), "down_proj": everything}[proj]
    target = "experts_down" if proj == "down_proj" else "experts_gate_up"
    return f"{prefix}.mlp.{target}.weight", (int(expert), rows), (everything,)


@dataclasses.dataclass(frozen=True)
class RowRange:
    """A PartReader of rows [start, stop) of another: one projection of a fused checkpoint tensor."""

    read: PartReader
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.read.shape[1:])

    @property
    def type_name(self) -> str | None:
        return getattr(self.read, "type_name", None)

    @property
    def row_block(self) -> int:
        return getattr(self.read, "row_block", 1)

    def __call__(self, part: tuple[slice, ...]) -> torch.Tensor:
        return self.read((self._rows(part[0]), *part[1:]))

    def int4_groups(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.read.int4_groups(self._rows(rows))

    def int8_groups(self, rows: slice, tensor_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read.int8_groups(self._rows(rows), tensor_type)

    def _rows(self, rows: slice) -> slice:
        inner = range(self.start, self.stop)[rows]
        return slice(inner.start, inner.stop)


def _unfused(tensors: Iterator[tuple[str, PartReader]], cfg: ModelConfig) -> Iterator[tuple[str, PartReader]]:
    """Phi-3 stores Q/K/V and gate/up fused; split into the separate projections, so that tensor-parallel
    ranks and the fused parameters of our model take their rows as from any other checkpoint."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    splits = {
        "self_attn.qkv_proj": {
            "self_attn.q_proj": (0, q),
            "self_attn.k_proj": (q, q + kv),
            "self_attn.v_proj": (q + kv, q + 2 * kv),
        },
        "mlp.gate_up_proj": {"mlp.gate_proj": (0, inter), "mlp.up_proj": (inter, 2 * inter)},
    }
    for name, read in tensors:
        fused = next((f for f in splits if f".{f}." in name), None) if cfg.architecture == "phi3" else None
        if fused is None:
            yield name, read
            continue
        total = max(stop for _, stop in splits[fused].values())
        if read.shape[0] != total:
            raise ValueError(f"checkpoint tensor {name!r} has {read.shape[0]} rows, expected {total} by the config")
        for part, (start, stop) in splits[fused].items():
            yield name.replace(fused, part), RowRange(read, start, stop)


def load_weights(model: CausalLM, src: ModelSource, convert: bool = True) -> None:
    """Fill the model from the checkpoint, tensor by tensor (`convert`: see iter_checkpoint)."""
    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    quantized = {name for name, m in modules.items() if format_of(m) is not None}
    seen: set[str] = set()
    for name, read in _unfused(iter_checkpoint(src, model.config, convert), model.config):
        place = _placement(name, model.config, model.tp)
        if place is None:
            continue
        target, rows, part = place
        _check_full_shape(name, read.shape, model.config)
        owner, _, attr = target.rpartition(".")
        if owner in quantized and attr == "weight":
            _load_quantized(modules[owner], name, rows, part, read)
        elif target in state:
            dest = state[target].data if rows is None else state[target].data[rows]
            dest.copy_(_checked(name, read(part), tuple(dest.shape)))
        else:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the {model.config.architecture} model")
        seen.add(target)
    expected = {n for n, _ in model.named_parameters()} | {f"{m}.weight" for m in quantized}
    expected |= {f"{m}.bias" for m in quantized if getattr(modules[m], "bias", None) is not None}
    tied = model.config.tie_word_embeddings
    missing = {n for n in expected if n not in seen and not (tied and n.startswith("lm_head."))}
    if missing:
        raise ValueError(f"checkpoint {src.path} lacks {sorted(missing)[:5]}")


def _check_full_shape(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> None:
    """A checkpoint tensor wider than the config says would otherwise be read in part (each rank reads
    its rows of it) and the model would run on a truncated matrix."""
    d, hidden, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "embed_tokens.weight": (cfg.vocab_size, hidden),
        "lm_head.weight": (cfg.vocab_size, hidden),
    }
    expected = next((v for k, v in shapes.items() if name.endswith(k)), None)
    if expected is not None and tuple(shape) != expected:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(shape)}, expected {expected} by the config")


def _checked(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != expected:
        shape = tuple(tensor.shape)
        raise ValueError(f"checkpoint tensor {name!r} has shape {shape} for this rank, expected {expected}")
    return tensor


def _load_quantized(module: nn.Module, name: str, rows: Any, part: tuple[slice, ...], read: PartReader) -> None:
    """`rows`: a row range, or (expert, row range) of stacked experts; None for everything."""
    rows = slice(None) if rows is None else rows
    expected = tuple(torch.empty(module.weight_shape, device="meta")[rows].shape)
    format_of(module).load(module, rows, read, part, lambda t: _checked(name, t, expected))


def plan_quantization(model: CausalLM, src: ModelSource, scheme: QuantScheme) -> dict[str, str]:
    """{module: format} under `scheme` (engine/quant/), from the checkpoint's tensor types."""
    if isinstance(scheme, NoQuant):
        return {}  # without reading a GGUF's header for its types
    parts = {name: [] for name, m in model.named_modules() if isinstance(m, (nn.Linear, ExpertWeights))}
    parts["embed_tokens"] = []
    if src.is_gguf:
        for name, read in _iter_gguf(src.path, model.config):
            place = _placement(name, model.config, TPGroup())
            owner = place and place[0].rpartition(".")[0]
            if owner in parts:
                parts[owner].append(read.type_name)
    else:
        parts = {name: ["F32"] for name in parts}
    if model.config.tie_word_embeddings:
        parts["lm_head"] = parts["embed_tokens"]
    return scheme.plan(parts)


def build_model(
    src: ModelSource,
    cfg: ModelConfig,
    backend,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup = TPGroup(),
    quant: QuantScheme | None = None,
) -> CausalLM:
    quant = quant or NoQuant()
    with torch.device("meta"):
        model = CausalLM(cfg, backend, tp)
    cache = gguf_cache_dir(src.path, f"quantized-{quant.name}-v{QUANTIZED_LAYOUT}") if src.is_gguf else None
    cached = cache is not None and (cache / QUANTIZED_PLAN).is_file()
    plan = json.loads((cache / QUANTIZED_PLAN).read_text()) if cached else plan_quantization(model, src, quant)
    with torch.device("meta"):
        quantize_modules(model, plan)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # first: the untied copy of a tied table is then never touched, so never resident
    for t in model.state_dict().values():
        t.zero_()  # vocab padding rows of a sharded embedding are never loaded
    model.build_rope_tables()  # not in the checkpoint: computed, and meta tensors hold no values
    if cached:
        _load_state(model, cache / CONVERTED_WEIGHTS)
    else:
        with progress(log, f"loading the weights of {src.path.name} (quant={quant.name})"):
            load_weights(model, src, convert=not plan)
        if plan and cache is not None:
            _publish(cache, lambda staging: _save_state(model, plan, staging))
    _gguf_reader.cache_clear()
    if plan:
        log.info("weights: %.0f MB (%s)", weight_bytes(model) / 2**20, _summary(plan))
    if device.type == "cpu":
        pack_for_dtype(model, dtype)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _summary(plan: dict[str, str]) -> str:
    counts = collections.Counter(plan.values())
    return ", ".join(f"{n} {fmt} layers" for fmt, n in sorted(counts.items()))


def _save_state(model: CausalLM, plan: dict[str, str], folder: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(folder / CONVERTED_WEIGHTS))  # tied tables once
    (folder / QUANTIZED_PLAN).write_text(json.dumps(plan))


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}  # fmt: skip


def _load_state(model: CausalLM, file: Path) -> None:
    """Read the cached tensors straight into the model's own. safetensors' `safe_open` maps the file, and every
    page of it read stayed resident beside the model: a cached SmolLM2 load peaked at 2.0x its weights and KV
    pool, against 1.2x here."""
    state = model.state_dict()
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            dest = state[name]
            if (SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"]) != (dest.dtype, list(dest.shape)):
                raise ValueError(f"{file} holds {name} as {entry['dtype']} {entry['shape']}, not the model's")
            f.seek(8 + n + entry["data_offsets"][0])
            f.readinto(dest.reshape(-1).view(torch.uint8).numpy())
