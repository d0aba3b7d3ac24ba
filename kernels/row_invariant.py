"""Batch-invariant products (config `batch_invariant=true`): a row's values do not depend on the step around it.

A float GEMM's bits for one row depend on how many rows the call has: oneDNN and MKL pick kernels, blocking and
the split over threads by shape (2026-12-06, AVX-512 machine: row 0 of x @ w differed from the lone row's for
every row count 2..512 in fp32, and between 32..128 and 512 rows for 576x1536 in bf16 and 1536x576 in both),
but not on the row's place in the call nor on its neighbours (6 of 6 shuffles equal, fp32 and bf16, calls of
16, 32 and 64 rows). Batched with `torch.bmm` the chunks were not safe either: 1536x576 differed with the
number of chunks (the thread split moves). So in batch-invariant mode a step's rows go one of two ways, by their
number, which the runner and scheduler make a matter of the kind of row:

- a decode step (at most FEW_ROWS rows: the runner splits larger ones; a speculative verification is one row
  per token): the few-row paths, a quantized layer computing each row as a lone row (kernels/quant_linear.py
  `each_row`), a float weight one GEMM of exactly FEW_ROWS rows, padded;
- a prefill step (padded by the runner to more than FEW_ROWS rows, and never mixed with decode rows by the
  scheduler, which also cuts prompts at fixed places): GEMMs in calls of a fixed number of rows,
  `mm_in_calls`, PROMPT_ROWS for a layer and HEAD_ROWS for the LM head (it sees the rows that sample).

`mm_in_calls` is an opaque op, so a compiled prefill graph runs the same ATen calls as an eager step. It takes
its operands in any layout (`flexible_layout`): held to the eager strides, inductor dequantized int4 weights
in a scalar loop, 11 ms per layer for SmolLM2's gate_up projection at 512 rows (the whole step took 0.74 s).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Rows per GEMM call: fewer re-read the weights more often, more pad short prompts further. SmolLM2 (int4, bf16,
# AMX), one 512-token prompt: 1480 / 1930 / 2040 tok/s with calls of 64 / 128 / 256 rows, 2550 with one GEMM.
PROMPT_ROWS = 128
HEAD_ROWS = 8


def in_calls(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """`product` of x's rows, called on `rows` rows at a time (the last call padded with zero rows; no rows
    still make one call, so that the output has its width)."""
    m = x.shape[0]
    if m <= rows:  # padded by rows - m (even 0: a test of m < rows would be one more graph, for m == rows)
        return product(F.pad(x, (0, 0, 0, rows - m)))[:m]
    padded = F.pad(x, (0, 0, 0, -m % rows))
    return torch.cat([product(c) for c in padded.split(rows)])[:m]


@torch.library.custom_op("engine::mm_in_calls", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def mm_in_calls(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """a @ b, `rows` rows of a per call (`in_calls`)."""
    return in_calls(lambda r: r @ b, a, rows)


@mm_in_calls.register_fake
def _(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def make_batch_invariant(model: torch.nn.Module) -> None:
    """Gives every linear layer of `model` (float or quantized, and the MoE experts' GEMMs) fixed-shape GEMM
    calls: HEAD_ROWS rows for the LM head, PROMPT_ROWS for the rest."""
    head = getattr(model, "lm_head", None)
    for m in model.modules():
        if hasattr(type(m), "invariant_rows"):
            m.invariant_rows = HEAD_ROWS if m is head else PROMPT_ROWS
