"""A fix to inductor's C++ code generation on AVX2 CPUs: 8-bit vector loads.

Inductor loads int8/uint8 operands of float arithmetic as `Vectorized<int8_t>::loadu(ptr, 8)`: eight
values, as many as one AVX2 float vector holds. On AVX2 a `Vectorized<int8_t>` has 32 lanes, and a load of
fewer than 32 goes through a stack buffer filled lane by lane and a `memcpy` (ATen's vec256_int.h; AVX-512
has masked loads instead). Every quantized weight byte the engine reads takes that path: on these AVX2
machines SmolLM2's default (int4) batch-1 decode ran at 11 tok/s, its int8 head alone 21 ms per step for
28 MB (1.3 GB/s), where the same code on an AVX-512 machine had run at ~150 tok/s.

ATen has the fast load for exactly this width (`loadu_one_fourth`: one 8-byte `_mm_loadl_epi64`), which
the code generator does not use; `apply` makes it use it. The other 24 lanes are left undefined instead of
filled with ones: inductor only ever reads the first eight (it converts them to one float vector or stores
eight). The compiled graphs' cache key names this fix, so code cached without it is not reused."""

from __future__ import annotations

import functools
from typing import Any

import torch

FIX_ID = "engine: int8/uint8 vector loads of 8 lanes through loadu_one_fourth (v1)"


@functools.cache
def needs_fix() -> bool:
    """True where inductor vectorizes float code 8 lanes wide over 32-lane int8 vectors (AVX2)."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return bool(isa) and isa.bit_width() == 256


@functools.cache
def apply() -> bool:
    """Patch the code generator (once per process); False where the CPU does not need it."""
    if not needs_fix():
        return False
    from torch._inductor.codegen import cpp

    original = cpp.CppVecKernel._get_vec_load_line

    def load_line(self: Any, var: str, index: Any, dtype: torch.dtype, load_mask: Any = None) -> str:
        line = original(self, var, index, dtype, load_mask)
        vec = self._get_vec_type(dtype)
        prefix = f"{vec}::loadu("
        if dtype in (torch.int8, torch.uint8) and load_mask is None and self.num_elems == 8 and line.startswith(prefix):
            pointer, count = line[len(prefix) : -1].rsplit(", ", 1)
            if count == "static_cast<int64_t>(8)":
                return f"{vec}::loadu_one_fourth({pointer})"
        return line

    cpp.CppVecKernel._get_vec_load_line = load_line
    return True


@functools.cache
def _cache_key() -> Any:
    """A no-op post-grad pass whose uuid puts this fix in inductor's FX graph cache key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class FixesKey(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            pass

        def uuid(self) -> str:
            return FIX_ID

    return FixesKey()


def cache_key_options() -> dict[str, Any]:
    """torch.compile options that keep code generated with and without the fix apart in the caches."""
    return {"post_grad_custom_post_pass": _cache_key()} if apply() else {}
