"""4-bit weights in groups of 32 with a scale and an offset each (kernels/quant_linear.py `Int4Linear`): the
smallest format, and GGUF's Q4_0, Q4_1 and Q4_K blocks taken as they are, without loss (Q4_K's 6-bit sub-block
scales and mins folded into fp32 per-group scales and offsets). A bfloat16 model on AVX-512 and AVX2 builds runs
them in ATen's packed layout (`pack_for_dtype`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.kernels.quant_linear import Int4Linear, PackedInt4Linear, packs_int4
from engine.quant import int8  # noqa: F401 (the heads of an int4 model are int8: registered with it)
from engine.quant.base import HEADS, QuantFormat


class Int4Format(QuantFormat):
    name = "int4"
    rank = 0
    exact_types = ("Q4_0", "Q4_1", "Q4_K")
    module_types = (Int4Linear,)

    def holds(self, module: str) -> bool:
        # The heads stay int8: int4 groups along the hidden size would save 14 MB on SmolLM2 but give up int8's
        # GEMM for batched steps (the 49152-row head at 32 rows: 4.5 ms through `_int_mm`, 25 ms in fp32).
        # MoE experts are int8 (Int8Experts): no int4 gathered-product kernel yet.
        return module not in HEADS and not module.rpartition(".")[2].startswith("experts_")

    def build(self, float_module: nn.Module, module: str) -> nn.Module:
        return Int4Linear(float_module.in_features, float_module.out_features, float_module.bias is not None)

    def load_part(self, target: nn.Module, rows: Any, read: Any, part: tuple[slice, ...], checked: Callable) -> None:
        if getattr(read, "type_name", None) in self.exact_types:
            q, scale, offset = read.int4_groups(part[0])  # the file's own 4-bit groups: no loss
            target.load_groups(rows, checked(q), scale, offset)
        else:
            super().load_part(target, rows, read, part, checked)


def int4_groups(rows: np.ndarray, tensor_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF 4-bit rows (bytes [R, row bytes]) -> (values [R, K] uint8 0..15, scales [R, K/32], offsets
    [R, K/32]) with weight = scale * value + offset, bit for bit what gguf.dequantize computes: every
    product and sum involved is exact in fp32 (fp16 scales times values of at most 10 bits)."""
    r = rows.shape[0]
    if tensor_type == "Q4_K":
        from gguf.quants import Q4_K

        blocks = rows.reshape(-1, 144)  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # 4 chunks of 64: low nibbles, then high nibbles
        values = np.concatenate((qs & 15, qs >> 4), axis=2)
        scale, offset = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    else:
        width = {"Q4_0": 18, "Q4_1": 20}[tensor_type]
        blocks = rows.reshape(-1, width)  # d (fp16)[, m (fp16)], 16 bytes: value j low, j + 16 high
        scale = blocks[:, 0:2].view(np.float16).astype(np.float32)
        qs = blocks[:, width - 16 :].reshape(-1, 1, 16)
        values = np.concatenate((qs & 15, qs >> 4), axis=1)
        offset = -8 * scale if tensor_type == "Q4_0" else blocks[:, 2:4].view(np.float16).astype(np.float32)
    q = torch.from_numpy(np.ascontiguousarray(values).reshape(r, -1))
    return q, torch.from_numpy(scale.reshape(r, -1)).clone(), torch.from_numpy(offset.reshape(r, -1)).clone()


def pack_for_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap the int4 layers that run faster in ATen's packed layout in a model of `dtype` (`packs_int4`) for their
    `PackedInt4Linear` form, before the model is cast to `dtype` (the zeros are computed from the fp32 scales and
    offsets). The engine cache keeps the portable layout: the packed one depends on the CPU."""
    for name, module in list(model.named_modules()):
        if packs_int4(module, dtype):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, PackedInt4Linear(module))
