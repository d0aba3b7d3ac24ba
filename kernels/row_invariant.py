"""Batch-invariant products (config `batch_invariant=true`): a row's values do not depend on the step around it.

A float GEMM's bits for one row depend on how many rows the call has: oneDNN and MKL pick kernels, blocking and
the split over threads by shape (2026-12-06, AVX-512 machine: row 0 of x @ w differed from the lone row's for
every row count 2..512 in fp32, and between 32..128 and 512 rows for 576x1536 in bf16 and 1536x576 in both),
but not on the row's place in the call nor on its neighbours (6 of 6 shuffles equal, fp32 and bf16, calls of
16, 32 and 64 rows). Batched with `torch.bmm` the chunks were not safe either: 1536x576 differed with the
number of chunks (the thread split moves). So in batch-invariant mode every product runs as calls of one
fixed shape, chosen by the kind of row, never by the step's size:

- decode rows (a decode step, a speculative verification) and the LM head's rows: the one-row path of a
  quantized layer (each row computed as a lone row, kernels/quant_linear.py `each_row`), or for a float
  weight one GEMM call of FEW_ROWS rows, padded;
- prompt rows (an eager prefill step: the runner marks it with `prompt_rows`): GEMM calls of PROMPT_ROWS
  rows, padded.

The runner keeps decode steps within FEW_ROWS rows, the scheduler never mixes decode rows with prompt rows
in one step and cuts prompts into chunks at fixed positions, and the attention of a decode row is the paged
decode kernel's, eager or compiled (engine/model_runner.py, engine/scheduler.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

# Rows per GEMM call for prompt rows: fewer re-read the weights more often, more pad short prompts further.
PROMPT_ROWS = 64

_step = threading.local()


@contextlib.contextmanager
def prompt_rows() -> Iterator[None]:
    """Marks the eager step run inside as one of prompt rows (this thread only: a background compilation
    traces decode graphs on another)."""
    _step.prompt = True
    try:
        yield
    finally:
        _step.prompt = False


def in_prompt_step() -> bool:
    """Compiled graphs are decode graphs only: batch-invariant mode runs prefill steps eagerly."""
    return not torch.compiler.is_compiling() and getattr(_step, "prompt", False)


def in_calls(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """`product` of x's rows, called on `rows` rows at a time (the last call padded with zero rows; no rows
    still make one call, so that the output has its width)."""
    m = x.shape[0]
    if m <= rows:  # padded by rows - m: compiled, the call's shape is then the constant `rows`, not a symbol
        return product(F.pad(x, (0, 0, 0, rows - m)) if m < rows else x)[:m]
    padded = F.pad(x, (0, 0, 0, -m % rows))
    return torch.cat([product(c) for c in padded.split(rows)])[:m]


def make_batch_invariant(model: torch.nn.Module) -> None:
    """Switches every linear layer of `model` (float or quantized) to the batch-invariant paths; the LM head
    keeps its rows on the few-row path (it sees only the rows that sample, a handful per step)."""
    head = getattr(model, "lm_head", None)
    for m in model.modules():
        if hasattr(type(m), "invariant"):
            m.invariant = "head" if m is head else "rows"
