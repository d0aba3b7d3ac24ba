"""Decoder-only transformer covering Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Phi-3 and Gemma 3 in plain PyTorch.

The families differ in switches of one config (`ModelConfig`): a bias on Q/K/V (Qwen2), per-head RMSNorm of
Q and K (Qwen3, Gemma 3), sliding-window layers (Mistral, Phi-3, Gemma 3's five of every six), RoPE scalings
(llama3, linear, longrope) and partial rotary dims, Gemma's (1 + w) norms around attention and MLP, routed
experts in place of the MLP (Qwen3-MoE). Checkpoint layouts (Phi-3's fused tensors, GGUF names) are the
loader's business. Tokens arrive flattened ([T] for the whole step, every request's new tokens back to
back); only attention needs to know which request a token belongs to, and that lives in the attention
backend's per-step metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.fusion import rounded
from engine.kernels.paged import LayerCache, PagedAttentionBase
from engine.kernels.quant_linear import FEW_ROWS, few_float_rows, float_linear
from engine.kernels.row_invariant import in_calls
from engine.parallel import TPGroup, check_divisible, shard_heads, vocab_shard

# Per family: what the HF config's model_type turns on (see ModelConfig.from_hf).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelConfig:
    architecture: str  # one of FAMILIES
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
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0
    # Sliding-window attention: a sliding layer sees the last `sliding_window` positions (itself included).
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # SLIDING/FULL per layer; None: every layer SLIDING if a window is set
    # Gemma 3: (1 + w) RMSNorm in fp32, norms after attention and MLP too, embeddings scaled by sqrt(hidden),
    # softmax scale from query_pre_attn_scalar, a RoPE base of its own for sliding layers.
    gemma: bool = False
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None
    final_logit_softcapping: float | None = None
    # Mixture of experts (Qwen3-MoE): layers listed in moe_layers route each token to its top-k experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: list[int] = field(default_factory=list)

    def window(self, layer: int) -> int:
        """The layer's sliding window, 0 for full attention."""
        if not self.sliding_window:
            return 0
        return self.sliding_window if self.layer_types is None or self.layer_types[layer] == SLIDING else 0

    def windows(self) -> tuple[int, ...]:
        """The distinct sliding windows of the model's layers (empty: full attention everywhere)."""
        return tuple(sorted({self.window(i) for i in range(self.num_layers)} - {0}))

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type", "llama")
        if model_type == "gemma3":  # a multimodal checkpoint's language model
            cfg = {**cfg.get("text_config", {}), "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in FAMILIES:
            archs = cfg.get("architectures") or [model_type]
            raise ValueError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}): supported model types are "
                f"{', '.join(FAMILIES)} (see the README's supported-models table)"
            )
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        local_rope = rope.get(SLIDING) if model_type == "gemma3_text" else None
        rope = rope.get(FULL, rope) if model_type == "gemma3_text" else rope
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if scaling is not None and "original_max_position_embeddings" in cfg:  # Phi-3 keeps it outside
            scaling = {"original_max_position_embeddings": cfg["original_max_position_embeddings"], **scaling}
        eos = cfg.get("eos_token_id")
        gemma = model_type == "gemma3_text"
        moe = model_type == "qwen3_moe"
        num_layers = cfg["num_hidden_layers"]
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            rope_scaling=scaling,
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=cfg.get("bos_token_id"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            partial_rotary_factor=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
            sliding_window=window,
            layer_types=cfg.get("layer_types") if window else None,
            gemma=gemma,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma else None,
            rope_local_theta=float(local_rope["rope_theta"]) if local_rope else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            num_experts=cfg.get("num_experts") or cfg.get("num_local_experts", 0) if moe else 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size", 0) if moe else 0,
            norm_topk_prob=cfg.get("norm_topk_prob", False),
            moe_layers=_moe_layers(cfg, num_layers) if moe else [],
        )


def _moe_layers(cfg: dict[str, Any], num_layers: int) -> list[int]:
    # transformers' rule (Qwen3MoeDecoderLayer): sparse where not listed dense and every `decoder_sparse_step`-th.
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before scaling, exactly as transformers does, so bf16 matches.
        dtype = x.dtype
        x = rounded(x.float(), dtype)  # a residual add fused into this kernel is otherwise left unrounded
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's convention: the weight is stored as w - 1, and the scaling happens in fp32 before the cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = rounded(x.float(), x.dtype)
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> RMSNorm:
    return (GemmaRMSNorm if cfg.gemma else RMSNorm)(dim, cfg.rms_norm_eps)


def _rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def _inv_freq(cfg: ModelConfig, theta: float, factors: list[float] | None = None) -> torch.Tensor:
    dim = _rotary_dim(cfg)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if factors is not None:  # longrope: a divisor per frequency, as transformers computes it
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)
    return 1.0 / (theta**exponents)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _rope_angles(cfg: ModelConfig, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """[max_position, rotary_dim / 2] angles of every position, and the factor on cos/sin."""
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return torch.outer(positions, _inv_freq(cfg, theta)), 1.0
    if kind == "llama3":
        return torch.outer(positions, _llama3_scaled(_inv_freq(cfg, theta), scaling)), 1.0
    if kind == "linear":
        return torch.outer(positions / scaling["factor"], _inv_freq(cfg, theta)), 1.0
    if kind in ("longrope", "su"):
        # Short factors up to the original context, long ones past it, per position (vLLM's rule). transformers
        # switches every position of a forward pass to the long factors once the sequence passes the original
        # context, so the two agree on every sequence that stays within it.
        original = scaling["original_max_position_embeddings"]
        short = torch.outer(positions, _inv_freq(cfg, theta, scaling["short_factor"]))
        long = torch.outer(positions, _inv_freq(cfg, theta, scaling["long_factor"]))
        angles = torch.where((positions < original).unsqueeze(1), short, long)
        factor = scaling.get("factor") or cfg.max_position_embeddings / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return angles, attention
    raise ValueError(f"unsupported rope_scaling type {kind!r}: implemented are llama3, linear and longrope")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over the first `rotary_dim` dims of each head, with a precomputed fp32 cos/sin table
    indexed by absolute position."""

    def __init__(self, cfg: ModelConfig, theta: float | None = None, scaled: bool = True) -> None:
        super().__init__()
        self.cfg, self.theta, self.scaled = cfg, cfg.rope_theta if theta is None else theta, scaled
        self.rotary_dim = _rotary_dim(cfg)
        # Placeholders until `build_table`: the model is built on the meta device, where computing the
        # table would import torch._dynamo (1.4 s of a server's start-up) for nothing.
        shape = (cfg.max_position_embeddings, self.rotary_dim)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)

    def build_table(self) -> None:
        freqs, factor = _rope_angles(self.cfg, self.theta, self.cfg.rope_scaling if self.scaled else None)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * factor, persistent=False)
        self.register_buffer("sin", emb.sin() * factor, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        if self.rotary_dim == q.shape[-1]:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        r = self.rotary_dim
        q_rot = q[..., :r] * cos + _rotate_half(q[..., :r]) * sin
        k_rot = k[..., :r] * cos + _rotate_half(k[..., :r]) * sin
        return torch.cat((q_rot, q[..., r:]), -1), torch.cat((k_rot, k[..., r:]), -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Linear(nn.Linear):
    """nn.Linear whose few-row calls have one shape (`float_linear`), and every call a fixed shape where
    `invariant_rows` is set (kernels/row_invariant.py)."""

    invariant_rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_linear(x, self.weight, self.bias, self.invariant_rows)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: PagedAttentionBase, tp: TPGroup) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        shard = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp.size, tp.rank)
        self.num_heads, self.num_kv_heads, self.head_dim = shard.q_heads, shard.kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Plain ints and floats: a compiled layer specialises on them (a sliding and a full layer are two graphs).
        self.window, self.scale = cfg.window(layer_idx), cfg.attention_scale
        # One fused projection: one GEMM instead of three per layer.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, self.head_dim)
            self.k_norm = make_norm(cfg, self.head_dim)
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
        out = self.backend.attend(cache, q, k, v, meta, window=self.window, scale=self.scale)
        return self.tp.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden activation {name!r}: implemented are {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        check_divisible(cfg.intermediate_size, tp.size)
        width = cfg.intermediate_size // tp.size
        self.tp = tp
        self.act = activation(cfg.hidden_act)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * width, bias=False)
        self.down_proj = Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(self.act(gate) * up))


class ExpertWeights(nn.Module):
    """One projection of every expert, stacked [experts, out, in] as transformers holds them."""

    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, k or 1, in] against each token's experts [T, k] -> [T, k, out]."""
        return (x[:, :, None, :] * self.weight[experts]).sum(-1)

    def expert(self, e: int) -> torch.Tensor:
        return self.weight[e]


class MoE(nn.Module):
    """Qwen3-MoE's sparse block: a router's softmax picks each token's top-k experts, whose SwiGLU outputs are
    summed with the router's weights (renormalised over the k where `norm_topk_prob`). The experts' weights
    are stacked [experts, out, in], as transformers holds them."""

    # Batch-invariant mode: the eager per-expert GEMMs in calls of FEW_ROWS rows, whatever the step (a prefill
    # step routes few rows to some experts). Compiled, `_gathered` computes each token on its own anyway.
    invariant_rows: int | None = None

    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        if tp.size > 1:
            raise ValueError("tensor parallelism is not implemented for mixture-of-experts layers (qwen3_moe)")
        experts, width, hidden = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.act = activation(cfg.hidden_act)
        self.gate = Linear(hidden, experts, bias=False)
        # Under quant: Int8Experts or GroupedInt8Experts (kernels/quant_linear.py).
        self.experts_gate_up = ExpertWeights(experts, 2 * width, hidden)
        self.experts_down = ExpertWeights(experts, hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if torch.compiler.is_compiling():
            return self._gathered(x, experts, weights)
        return self._grouped(x, experts, weights)

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token against its own k experts' rows, written as products and sums over gathered weights: one
        graph for every routing (no per-expert shapes), and inductor folds the gather into the loops that read
        the weights, so only the k experts a token uses are read and nothing [T, k, out, in] is materialised."""
        gate_up = self.experts_gate_up.gathered(x[:, None, :], experts)  # [T, k, 2 * width]
        gate, up = gate_up.chunk(2, dim=-1)
        out = self.experts_down.gathered(self.act(gate) * up, experts)  # [T, k, hidden]
        return (out * weights.unsqueeze(-1)).sum(1)

    def _grouped(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eagerly: one GEMM per expert over the tokens routed to it (the gathered form would materialise every
        token's expert weights), experts taken in the order the router's choices sort them."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.experts_gate_up.weight_shape[0]).tolist()
        tokens = order // self.top_k
        out = torch.zeros_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            rows = tokens[start : start + n]
            gate, up = self._linear(x[rows], self.experts_gate_up.expert(expert)).chunk(2, dim=-1)
            y = self._linear(self.act(gate) * up, self.experts_down.expert(expert))
            out.index_add_(0, rows, y * weights.flatten()[order[start : start + n]].unsqueeze(-1))
            start += n
        return out

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The tokens routed to an expert: few in a decode step, a verification or a prefill step alike, so calls
        # of up to FEW_ROWS compute each row as `float_linear` does; all calls are of FEW_ROWS in batch-invariant mode.
        if self.invariant_rows is None:
            return float_linear(x, weight)
        return in_calls(lambda rows: F.linear(rows, weight), x, FEW_ROWS)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: PagedAttentionBase, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer_idx, backend, tp)
        # Llama's post_attention_layernorm is the norm before the MLP; Gemma's follows attention (a "sandwich").
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if cfg.gemma:
            self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
        self.sandwich = cfg.gemma
        self.mlp = MoE(cfg, tp) if layer_idx in cfg.moe_layers else MLP(cfg, tp)

    def kv_cache(self) -> LayerCache:
        return self.self_attn.backend.layer_cache(self.self_attn.layer_idx)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, cache: LayerCache, meta: Any
    ) -> torch.Tensor:
        # The residual stream as the model's dtype holds it: inductor dropped the bf16 rounding of the layer
        # before's output where its graph fused across the layers (batch-1 decode under compile.regional), so
        # that graph and the several-row one disagreed (kernels/fusion.py `rounded`).
        x = rounded(x.float(), x.dtype).to(x.dtype)
        attn = self.self_attn(self.input_layernorm(x), positions, rope, cache, meta)
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


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
        # Gemma 3's sliding layers rotate with a RoPE base of their own, unscaled.
        self.rope_local = RotaryEmbedding(cfg, cfg.rope_local_theta, scaled=False) if cfg.rope_local_theta else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend, tp) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = Linear(cfg.hidden_size, vocab_rows, bias=False)
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

    def build_rope_tables(self) -> None:
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.build_table()

    def rope_of(self, layer: DecoderLayer) -> RotaryEmbedding:
        return self.rope_local if self.rope_local is not None and layer.self_attn.window else self.rope

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        """Hidden states [T, hidden] for flattened tokens; call `compute_logits` on the rows you need."""
        if self.tp.size == 1:
            x = self.embed_tokens(input_ids)
        else:
            local = input_ids - self.vocab_start
            mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
            x = self.embed_tokens(torch.where(mine, local, 0)) * mine.unsqueeze(-1)
            x = self.tp.all_reduce(x)
        if self.config.gemma:  # by the scale rounded to the activations' dtype, as transformers does
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x = self.run_layer(layer, x, positions, self.rope_of(layer), layer.kv_cache(), meta)
        return x

    def compute_logits(self, hidden: torch.Tensor, decode_rows: bool = True) -> torch.Tensor:
        """`decode_rows`: the rows are a decode step's (a float head then computes up to FEW_ROWS of them as
        `float_linear` does); a prefill step's sampled rows take one plain product, so that the prefill graph
        serves any number of them (the warm-up's 2 rows and a step of 9 prompts were two graphs otherwise)."""
        hidden = self.norm(hidden)
        if not isinstance(self.lm_head, nn.Linear) or self.lm_head.invariant_rows:  # quantized, or batch-invariant
            local = self.lm_head(hidden)
        else:
            w = self.lm_head.weight
            # Compiled, a plain linear lets inductor pick its own GEMM for the frozen weight. Eagerly, W @ h.T beats
            # F.linear: for the tall vocab matrix oneDNN picks a far better fp32 kernel (15 vs 31 ms at 8 rows on 2
            # cores). Up to FEW_ROWS rows as `float_linear` computes them, and for its reason.
            product = (lambda h: F.linear(h, w)) if torch.compiler.is_compiling() else (lambda h: torch.mm(w, h.T).T)
            few = decode_rows and hidden.shape[0] <= FEW_ROWS
            local = few_float_rows(product, hidden) if few else product(hidden)
        logits = self.tp.all_gather_last_dim(local)
        logits = logits[:, : self.config.vocab_size].float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
