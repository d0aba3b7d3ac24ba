"""`stored` keeps a reduction's operand out of the reduction's loop in the compiled code; `rounded` rounds to bf16
inside fused kernels; compiled CPU code contracts multiply-adds into FMAs as `compile.cpu.fp_contract` says."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from engine.config import compose_config
from engine.kernels.fusion import rounded, stored
from engine.step_graphs import compile_options


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


def _rounded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # fp32 a + b rounded to bf16, then scaled in fp32: compiled as one kernel, where a plain round trip
    # (`.to(bfloat16).float()`) is dropped.
    return rounded(a + b, torch.bfloat16) * 3.0


@pytest.mark.parametrize("rows", [1, 9, 64])
def test_rounded_rounds_to_nearest_even_in_compiled_code_at_any_row_count(rows):
    """The same values as eager bf16 rounding, ties included, where a plain round trip would be fused away (a
    bf16 model's graphs of different row counts must agree). Noted: `stored(x.to(bfloat16)).float()` does not
    keep the rounding either (inductor fused it into one kernel and dropped the conversion)."""
    torch.manual_seed(0)
    a = torch.randn(rows, 256) * 4
    # Exact ties between two bf16 values, both parities: 1 + (2k + 1) * 2^-8 halfway between neighbours.
    a[0, :64] = 1 + (2 * torch.arange(64) + 1) * 2.0**-8
    b = torch.zeros_like(a)
    torch._dynamo.reset()
    got = torch.compile(_rounded_sum, dynamic=False)(a, b)
    assert torch.equal(got, (a + b).to(torch.bfloat16).float() * 3.0)


def _multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return a * b + c


def test_compiled_cpu_code_contracts_multiply_adds_as_configured():
    """`compile.cpu.fp_contract` reaches inductor's C++ compiler: with `fast`, a * b + c rounds once, as an FMA; with
    `off` (the default) twice. With a = b = 1 + 2^-12 the product's last bit (2^-24) is lost when it is rounded
    before the add."""
    a = torch.full((64,), 1 + 2**-12)
    c = -(a * a)  # the rounded product: a separate multiply and add give exactly 0
    results = {}
    for contract in ("off", "fast"):
        cfg = compose_config(**{"compile.cpu.fp_contract": contract}).compile
        torch._dynamo.reset()
        fn = torch.compile(_multiply_add, dynamic=False, **compile_options(cfg, torch.device("cpu"), False))
        results[contract] = fn(a, a, c)
    assert torch.equal(results["off"], torch.zeros(64))
    assert torch.equal(results["fast"], torch.full((64,), 2.0**-24))
