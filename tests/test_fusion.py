"""`stored` keeps a reduction's operand out of the reduction's loop in the compiled code."""

from __future__ import annotations

import torch
from torch._inductor.utils import run_and_get_code

from engine.kernels.fusion import stored


def _normed_product(store: bool):
    def product(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)  # RMSNorm, as before a projection
        return ((stored(x) if store else x) * w.float()).sum(-1)

    return product


def test_stored_operand_is_computed_once_not_per_output_row():
    torch.manual_seed(0)
    h, w = torch.randn(1, 96), torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    codes = {}
    for store in (False, True):
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(_normed_product(store), dynamic=False), h, w)
        torch.testing.assert_close(out, _normed_product(False)(h, w), rtol=1e-5, atol=1e-3)  # summation order
        codes[store] = "\n".join(code)
    # The normalized row is a [1, 96] buffer of its own only when stored; inlined, the product loop over
    # the 40 output rows recomputes it (the reason for `stored`: kernels/fusion.py).
    assert "empty_strided_cpu((1, 96)" not in codes[False]
    assert "empty_strided_cpu((1, 96)" in codes[True]
