"""engine/inductor_fixes.py: on AVX2, compiled code loads 8-bit operands with one 8-byte load (not through a
buffer filled lane by lane), computes the same values, and compiled graphs cached without the fix stay apart."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from engine import inductor_fixes
from engine.config import compose_config
from engine.step_graphs import compile_options

pytestmark = pytest.mark.skipif(
    not inductor_fixes.needs_fix(), reason="the fix concerns 256-bit (AVX2) vector code; this CPU vectorizes wider"
)


def _dequantized_products(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    nibbles = (packed & 15).float() + (packed >> 4).float()  # uint8 operands
    return (x * w.float()).sum(-1) + nibbles.sum(-1)  # int8 operands


def test_8bit_operands_are_loaded_in_one_instruction():
    torch.manual_seed(0)
    x = torch.randn(1, 200)
    w = torch.randint(-127, 128, (48, 200), dtype=torch.int8)
    packed = torch.randint(0, 256, (48, 64), dtype=torch.uint8)
    assert inductor_fixes.apply()
    torch._dynamo.reset()
    fn = torch.compile(_dequantized_products, dynamic=False, options=inductor_fixes.cache_key_options())
    out, code = run_and_get_code(fn, x, w, packed)
    code = "\n".join(code)
    assert "Vectorized<int8_t>::loadu_one_fourth(" in code
    assert "Vectorized<uint8_t>::loadu_one_fourth(" in code
    assert "Vectorized<int8_t>::loadu(" not in code and "Vectorized<uint8_t>::loadu(" not in code
    torch.testing.assert_close(out, _dequantized_products(x, w, packed), rtol=1e-5, atol=1e-3)


def test_the_fix_is_part_of_the_compiled_graphs_cache_key():
    options = compile_options(compose_config().compile, torch.device("cpu"))["options"]
    key = options["post_grad_custom_post_pass"]
    assert key.uuid() == inductor_fixes.FIX_ID
