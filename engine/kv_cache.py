"""The paged KV pool: one K and one V tensor per layer, [num_pages, page_size, kv_heads, head_dim].

Page 0 is never handed out: padded batch rows (bucketed decode) write their garbage K/V there.
"""

from __future__ import annotations

import torch

SCRATCH_PAGE = 0


def pages_for_budget(
    num_layers: int, kv_heads: int, head_dim: int, page_size: int, memory_mb: float, dtype: torch.dtype
) -> int:
    bytes_per_page = 2 * num_layers * page_size * kv_heads * head_dim * dtype.itemsize
    return int(memory_mb * 2**20 // bytes_per_page)


class KVPool:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"invalid kv_cache.num_pages={num_pages}: need at least 2 (page 0 is scratch)")
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_pages = num_pages
        self.page_size = page_size


class PageAllocator:
    """Free list of page indices. Double frees and foreign pages are bugs, so they raise."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low pages first
        self._is_free = [True] * num_pages
        self._is_free[SCRATCH_PAGE] = False

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p == SCRATCH_PAGE or self._is_free[p]:
                raise RuntimeError(f"page {p} freed twice or never allocated")
            self._is_free[p] = True
            self._free.append(p)
