"""int8 weights with a scale per group of 32 inputs (kernels/quant_linear.py `GroupedInt8Linear`,
`GroupedInt8Embedding`): what `auto` makes of 5- to 8-bit GGUF blocks, and of the 4-bit blocks of a layer int4 does
not hold (the LM head, the embeddings). Q8_0, Q5_0 and Q4_0 blocks are symmetric, 32 values times one fp16 scale,
so they are taken as they are (no loss); Q5_1/Q5_K/Q6_K/Q4_1/Q4_K (offsets, or two scales per 32 values),
dequantized, are rounded to 8 bits per group of 32, finer than their own 4 to 6 bits (one scale per row lost more:
its 8 bits span a whole row's range)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.kernels.quant_linear import GroupedInt8Embedding, GroupedInt8Experts, GroupedInt8Linear
from engine.models.transformer import ExpertWeights
from engine.quant import int8  # noqa: F401 (int8 holds every layer: the fallback of `settle`, registered with it)
from engine.quant.base import QuantFormat

# An fp16 scale first, then 32 values (8 bits; 5 bits: 4 + 16 bytes; 4 bits: 16 bytes)
BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18}


class GroupedInt8Format(QuantFormat):
    name = "int8_groups"
    rank = 2  # finer than int8's one scale per row
    exact_types = tuple(BLOCK_BYTES)
    module_types = (GroupedInt8Linear, GroupedInt8Embedding, GroupedInt8Experts)

    def build(self, float_module: nn.Module, module: str) -> nn.Module:
        if isinstance(float_module, ExpertWeights):
            return GroupedInt8Experts(*float_module.weight_shape)
        if isinstance(float_module, nn.Embedding):
            return GroupedInt8Embedding(float_module.num_embeddings, float_module.embedding_dim)
        return GroupedInt8Linear(float_module.in_features, float_module.out_features, float_module.bias is not None)

    def load_part(self, target: nn.Module, rows: Any, read: Any, part: tuple[slice, ...], checked: Callable) -> None:
        if getattr(read, "type_name", None) in self.exact_types:
            q, scale = read.int8_groups(part[0], read.type_name)  # the file's own blocks: no loss
            target.load_groups(rows, checked(q), scale)
        else:
            super().load_part(target, rows, read, part, checked)


def int8_groups(rows: np.ndarray, tensor_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0/Q5_0/Q4_0 rows (bytes [..., R, row bytes]; stacked experts lead) -> (values [..., R, K] int8,
    scales [..., R, K/32] fp32) whose products are bit for bit what gguf.dequantize gives. Q8_0's values are its
    bytes; Q5_0's and Q4_0's, dequantized, are the fp16 scale times a small integer (exact in fp32), which dividing
    recovers."""
    import gguf

    lead = rows.shape[:-1]
    blocks = rows.reshape(-1, BLOCK_BYTES[tensor_type])
    scale = blocks[:, :2].view(np.float16).astype(np.float32)
    if tensor_type == "Q8_0":
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8)
    else:
        values = gguf.dequantize(rows, gguf.GGMLQuantizationType[tensor_type]).reshape(-1, 32)
        q = np.round(values / np.where(scale == 0, 1, scale)).astype(np.int8)
    return torch.from_numpy(q.reshape(*lead, -1)), torch.from_numpy(scale.reshape(*lead, -1))
