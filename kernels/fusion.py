"""Fusion control for inductor: where a value must be computed once instead of inside its consumers."""

from __future__ import annotations

import torch


def stored(x: torch.Tensor) -> torch.Tensor:
    """`x` itself; compiled, a buffer that inductor writes once before the loops that read it (lowering
    `as_strided` realizes its input). Inductor inlines cheap producers into their consumers, which is
    right for a pointwise chain and wrong for a reduction's operand that every output re-reads:

    - quantized one-row products (kernels/quant_linear.py): the residual add and RMSNorm before them, the
      SiLU gate and int4's x_hi - 16 x_lo were recomputed for every output row. SmolLM2 batch-1 decode
      (one script, runs alternated): int8 112-129 -> 148-157 tok/s (layer kernel 183 -> 138 us, head
      1.14 -> 0.92 ms); int4 94-105 -> 118-130 with the input stored, 156-162 with x_hi - 16 x_lo too.
      Inductor's global `realize_opcount_threshold=4` realized the same inputs for int8 but also int4's
      whole float product (4 bytes written per weight): int4 75 tok/s.
    - decode attention (kernels/decode_attention.py): the query's dequantization (two int8 digits from
      `_int_mm`), RoPE and scaling were recomputed for every slot of the context, inside the loop of each
      score. Offline int8 workload (`experiments/offline_throughput.py`): the compiled decode layer
      3.89 -> 2.67 s of a 12-13 s run, 4.28x -> 5.28x transformers (median of 3 rounds).
    """
    return x.as_strided(x.shape, x.stride())


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `x` rounded to the nearest bfloat16 (ties to even) where `dtype` is bfloat16, staying fp32. Inductor
    drops a `.to(bfloat16).float()` round trip inside a fused kernel, so whether a value was rounded depended on
    where the kernels were cut: a bf16 model's batch-1 decode graph fed a one-row product SiLU(gate) * up
    unrounded, its 4-row graph rounded, and a row's logits differed between the two (a speculative verification
    and a plain decode step parted; eager rounds everywhere). Integer arithmetic on the bits is not dropped.
    Inductor's `emulate_precision_casts` rounds every cast instead; it cost 40% of SmolLM2's decode speed."""
    if dtype != torch.bfloat16 or not torch.compiler.is_compiling():  # eager values are rounded already
        return x
    bits = x.view(torch.int32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000).view(torch.float32)
