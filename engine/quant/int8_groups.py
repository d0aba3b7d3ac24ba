"""int8 weights with a scale per group of 32 inputs (kernels/quant_linear.py `GroupedInt8Linear`,
`GroupedInt8Embedding`): what `auto` makes of 5- to 8-bit GGUF blocks. Q8_0 blocks are taken as they are
(32 int8 values and one scale each: no loss); Q5_0/Q5_1/Q5_K/Q6_K, dequantized, are rounded to 8 bits per group of
32, far finer than their own 5 or 6 (one scale per row lost more: its 8 bits span a whole row's range)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.kernels.quant_linear import GroupedInt8Embedding, GroupedInt8Linear
from engine.quant import int8  # noqa: F401 (MoE experts settle to int8: registered with it)
from engine.quant.base import QuantFormat

Q8_0_BLOCK = 34  # bytes: an fp16 scale, then 32 int8 values


class GroupedInt8Format(QuantFormat):
    name = "int8_groups"
    rank = 2  # finer than int8's one scale per row
    exact_types = ("Q8_0",)
    module_types = (GroupedInt8Linear, GroupedInt8Embedding)

    def holds(self, module: str) -> bool:
        return not module.rpartition(".")[2].startswith("experts_")  # no grouped gathered-product kernel yet

    def build(self, float_module: nn.Module, module: str) -> nn.Module:
        if isinstance(float_module, nn.Embedding):
            return GroupedInt8Embedding(float_module.num_embeddings, float_module.embedding_dim)
        return GroupedInt8Linear(float_module.in_features, float_module.out_features, float_module.bias is not None)

    def load(self, target: nn.Module, rows: Any, read: Any, part: tuple[slice, ...], checked: Callable) -> None:
        if getattr(read, "type_name", None) in self.exact_types:
            q, scale = read.int8_groups(part[0])  # the file's own blocks: no loss
            target.load_groups(rows, checked(q), scale)
        else:
            super().load(target, rows, read, part, checked)


def int8_groups(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 rows (bytes [R, row bytes]) -> (values [R, K] int8, scales [R, K/32] fp32), bit for bit what
    gguf.dequantize multiplies."""
    r = rows.shape[0]
    blocks = rows.reshape(-1, Q8_0_BLOCK)
    scale = blocks[:, :2].view(np.float16).astype(np.float32)
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8)
    return torch.from_numpy(q.reshape(r, -1)), torch.from_numpy(scale.reshape(r, -1))
