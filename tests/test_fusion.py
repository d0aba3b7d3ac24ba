"""`stored` keeps a reduction's operand out of the reduction's loop in the compiled code; compiled CPU code contracts
multiply-adds into FMAs as `compile.cpu.fp_contract` says."""

from __future__ import annotations

import torch
from torch._inductor.utils import run_and_get_code

from engine.config import compose_config
from engine.kernels.fusion import stored
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
