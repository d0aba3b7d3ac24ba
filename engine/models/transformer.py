"""Decoder-only transformer covering Llama, Qwen2 and Qwen3 in plain PyTorch.

The three families differ only in two switches: Qwen2 adds a bias to the Q/K/V projection, Qwen3
RMS-normalises each head of Q and K before RoPE. Tokens arrive flattened ([T] for the whole step, every
request's new tokens back to back); only attention needs to know which request a token belongs to, and
that lives in the attention backend's per-step metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.paged import LayerCache, PagedAttentionBase
from engine.parallel import TPGroup, check_divisible, shard_heads, vocab_shard


@dataclass
class ModelConfig:
    architecture: str  # llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3"):
            raise ValueError(f"unsupported model_type {model_type!r}: expected llama, qwen2 or qwen3")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
            rope_scaling=scaling,
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=cfg.get("bos_token_id"),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before scaling, exactly as transformers does, so bf16 matches.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}: only llama3 scaling is implemented")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed fp32 cos/sin table indexed by absolute position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Placeholders until `build_table`: the model is built on the meta device, where computing the
        # table would import torch._dynamo (1.4 s of a server's start-up) for nothing.
        shape = (cfg.max_position_embeddings, cfg.head_dim)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)

    def build_table(self) -> None:
        freqs = torch.outer(torch.arange(self.cfg.max_position_embeddings, dtype=torch.float32), _inv_freq(self.cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: PagedAttentionBase, tp: TPGroup) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        shard = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp.size, tp.rank)
        self.num_heads, self.num_kv_heads, self.head_dim = shard.q_heads, shard.kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # One fused projection: one GEMM instead of three per layer.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.backend = backend

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, cache: LayerCache, meta: Any
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        out = self.backend.attend(cache, q, k, v, meta)
        return self.tp.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        check_divisible(cfg.intermediate_size, tp.size)
        width = cfg.intermediate_size // tp.size
        self.tp = tp
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: PagedAttentionBase, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, backend, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def kv_cache(self) -> LayerCache:
        return self.self_attn.backend.layer_cache(self.self_attn.layer_idx)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, cache: LayerCache, meta: Any
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_layer(
    layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, cache: LayerCache, meta: Any
) -> torch.Tensor:
    """One decoder layer, its KV cache passed in rather than looked up by index: every layer is then the
    same function of its tensors, which lets a compiler build one layer's code and reuse it for all."""
    return layer(x, positions, rope, cache, meta)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: PagedAttentionBase, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        # Under tensor parallelism each rank holds one slice of the (padded) vocabulary.
        self.vocab_start, vocab_rows = vocab_shard(cfg.vocab_size, tp.size, tp.rank)
        # An explicit (uninitialised) weight skips the random init the checkpoint overwrites anyway; on the
        # meta device that init would import torch._dynamo too.
        self.embed_tokens = nn.Embedding(vocab_rows, cfg.hidden_size, _weight=torch.empty(vocab_rows, cfg.hidden_size))
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_rows, bias=False)
        self.tie_weights()
        self.run_layer: Callable[..., torch.Tensor] = run_layer  # engine/step_graphs.py may wrap it

    def tie_weights(self) -> None:
        # Also called after `to_empty`, which gives every parameter its own storage.
        if not self.config.tie_word_embeddings:
            return
        if isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight
        else:  # quantized (kernels/quant_linear.py): one int8 table serves both
            self.embed_tokens.qweight, self.embed_tokens.scale = self.lm_head.qweight, self.lm_head.scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        """Hidden states [T, hidden] for flattened tokens; call `compute_logits` on the rows you need."""
        if self.tp.size == 1:
            x = self.embed_tokens(input_ids)
        else:
            local = input_ids - self.vocab_start
            mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
            x = self.embed_tokens(torch.where(mine, local, 0)) * mine.unsqueeze(-1)
            x = self.tp.all_reduce(x)
        for layer in self.layers:
            x = self.run_layer(layer, x, positions, self.rope, layer.kv_cache(), meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        if not isinstance(self.lm_head, nn.Linear):  # quantized
            local = self.lm_head(hidden)
        elif torch.compiler.is_compiling():
            # Inside a compiled graph a plain linear lets inductor pick its own GEMM for the frozen weight.
            local = F.linear(hidden, self.lm_head.weight)
        else:
            # Eagerly, W @ h.T beats F.linear: for the tall vocab matrix oneDNN picks a far better fp32
            # kernel this way (measured 15 vs 31 ms at 8 rows on 2 cores).
            local = torch.mm(self.lm_head.weight, hidden.T).T
        logits = self.tp.all_gather_last_dim(local)
        return logits[:, : self.config.vocab_size].float()
