"""Which layers run quantized, in which format, and how GGUF's quantized blocks become those formats.

`quant=` picks a mode: `none` (every weight in the model dtype), `int8` or `int4` (quantize every linear
layer at load), or `auto` (keep what a GGUF file holds: 4-bit blocks stay 4-bit, 5- to 8-bit blocks
become int8, float tensors stay float). A fused layer (QKV, gate+up) takes the most precise format of
its parts. The LM head and the token embeddings (one table when tied) are int8 whenever they are
quantized at all: int4 groups along the hidden size would save 14 MB on SmolLM2 but give up int8's
GEMM for the batched steps (the 49152-row head at 32 rows: 4.5 ms through `_int_mm`, 25 ms in fp32 here).

What each GGUF type becomes under `auto`:

| GGUF type | format | loss |
|---|---|---|
| F32, F16, BF16 | model dtype | none |
| Q4_0, Q4_1, Q4_K | int4, groups of 32 with scale and offset | none (same values, same groups) |
| Q8_0, Q5_0, Q5_1, Q5_K, Q6_K | int8 per row (dequantized, then re-quantized) | small (perplexity-tested) |
| anything else (Q2_K, Q3_K, IQ*) | int8 per row, as above | that of the file |
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from engine.kernels.quant_linear import Int4Linear, Int8Embedding, Int8Linear

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
HEADS = ("embed_tokens", "lm_head")
_RANK = {"float": 2, "int8": 1, "int4": 0}  # a fused layer takes the most precise of its parts' formats
# int8 layers whose several-row steps quantize activations to one int8 digit instead of two. The attention
# output has no outlier channels and the head's input is normalised: SmolLM2's perplexity on
# tests/data/perplexity.txt (fp32 22.76, two digits everywhere 22.83) is 22.77 with one digit in o_proj,
# 22.89 in the head, against 23.06 / 23.03 / 23.16 in qkv / gate_up / down. They hold 28% of a step's
# int8 products (the head alone 21% at SmolLM2's 49152 rows), which two digits double.
ONE_DIGIT = ("o_proj", "lm_head")


def source_format(tensor_type: str) -> str:
    """The format `auto` keeps for a checkpoint tensor of this type (a GGUF type name, or 'F32' etc.)."""
    if tensor_type in FLOAT_TYPES:
        return "float"
    return "int4" if tensor_type in INT4_TYPES else "int8"


def plan_formats(mode: str, parts: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """{module: 'int8' | 'int4'} for the quantized modules, given each linear module's (and the heads')
    checkpoint tensor types. Modules left out stay in the model dtype."""
    plan = {}
    for module, types in parts.items():
        if mode == "auto":
            fmt = max((source_format(t) for t in types), key=_RANK.__getitem__)
        else:
            fmt = {"none": "float"}.get(mode, mode)
        if fmt != "float":
            plan[module] = "int8" if module in HEADS else fmt
    return plan


def quantize_modules(model: nn.Module, plan: Mapping[str, str]) -> None:
    """Swap the planned modules for their quantized forms (on the meta device, before loading)."""
    for name, fmt in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new = Int8Embedding(old.num_embeddings, old.embedding_dim)
        else:
            bias = old.bias is not None
            if fmt == "int8":
                new = Int8Linear(old.in_features, old.out_features, bias, digits=1 if attr in ONE_DIGIT else 2)
            else:
                new = Int4Linear(old.in_features, old.out_features, bias)
        setattr(parent, attr, new)


def weight_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied table once
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------- GGUF int4 blocks


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
