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
