"""int8 weights, one scale per output row (kernels/quant_linear.py `Int8Linear`, `Int8Embedding`, `Int8Experts`):
the fastest format for batched steps on CPUs with VNNI (`torch._int_mm` on int8 activation digits), `quant=int8`,
and the format of quantized MoE experts. `auto` keeps 5- to 8-bit GGUF blocks in grouped int8 instead
(engine/quant/int8_groups.py): one scale per row re-quantizes them with a loss."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from engine.kernels.quant_linear import Int8Embedding, Int8Experts, Int8Linear
from engine.models.transformer import ExpertWeights
from engine.quant.base import QuantFormat

# Layers whose several-row steps quantize activations to one int8 digit instead of two: their inputs carry no
# outlier channels (perplexity unchanged on SmolLM2; docs/performance.md, 2026-12-01), and they hold 28% of a
# step's int8 products, which two digits double.
ONE_DIGIT = ("o_proj", "lm_head")


class Int8Format(QuantFormat):
    name = "int8"
    rank = 1
    exact_types: ClassVar[tuple[str, ...]] = ()  # holds no GGUF type bit for bit: one scale per row
    module_types = (Int8Linear, Int8Embedding, Int8Experts)

    def build(self, float_module: nn.Module, module: str) -> nn.Module:
        if isinstance(float_module, ExpertWeights):
            return Int8Experts(*float_module.weight_shape)
        if isinstance(float_module, nn.Embedding):
            return Int8Embedding(float_module.num_embeddings, float_module.embedding_dim)
        bias = float_module.bias is not None
        digits = 1 if module in ONE_DIGIT else 2
        return Int8Linear(float_module.in_features, float_module.out_features, bias, digits=digits)
