"""The paged KV pool and its page allocator.

Every layer keeps K and V as [num_pages, page_size, kv_heads, head_dim]. A model with sliding-window layers
beside full ones (Gemma 3: five of every six layers see the last 512 tokens) pages its two layer groups
separately, as vLLM's hybrid allocator does: a sequence holds a page of the full layers for every page of
context, but pages of the windowed layers only for its last `window` tokens, so at 8k tokens of context
Gemma 3 keeps ~0.2x the K/V of keeping every layer whole. Both groups draw on one memory: the pool is a row of
superblocks of lcm(full layers, windowed layers) layer-pages, and a superblock serves whichever group claims
it while it holds pages of that group, so the split between the groups follows the workload.

Page 0 of every group is never handed out: padded batch rows (bucketed decode) write their garbage K/V there,
and a windowed layer's page table points there for pages that left the window.
"""

from __future__ import annotations

import math

import torch

SCRATCH_PAGE = 0


def pages_for_budget(
    num_layers: int, kv_heads: int, head_dim: int, page_size: int, memory_mb: float, dtype: torch.dtype
) -> int:
    bytes_per_page = 2 * num_layers * page_size * kv_heads * head_dim * dtype.itemsize
    return int(memory_mb * 2**20 // bytes_per_page)


class _Superblocks:
    """The shared memory of the page groups: superblocks of `span` layer-pages, each free or claimed by the
    group whose pages it holds. Pages are reference counted (the prefix cache and a sequence may both hold a
    windowed page); a page goes back when its count reaches zero, its superblock when all its pages have."""

    def __init__(self, num_supers: int, group_layers: tuple[int, ...]) -> None:
        if num_supers < 2:
            raise ValueError(f"invalid kv_cache.num_pages: the pool holds {num_supers - 1} usable pages, need 1")
        self.span = math.lcm(*group_layers)
        self.group_layers = group_layers
        self.per_super = [self.span // n for n in group_layers]
        self.num_supers = num_supers
        self.free_supers = list(range(num_supers - 1, SCRATCH_PAGE, -1))  # pop() hands out low ones first
        self.partial: list[dict[int, list[int]]] = [{} for _ in group_layers]  # super -> its free pages
        self.partial_free = [0] * len(group_layers)
        self.used: list[dict[int, int]] = [{} for _ in group_layers]  # claimed super -> pages in use
        self.refs = [[0] * (num_supers * m) for m in self.per_super]

    def num_free(self, g: int) -> int:
        return len(self.free_supers) * self.per_super[g] + self.partial_free[g]

    def alloc(self, g: int, n: int) -> list[int] | None:
        if n > self.num_free(g):
            return None
        m, partial, pages = self.per_super[g], self.partial[g], []
        while len(pages) < n:
            if not partial:
                s = self.free_supers.pop()
                partial[s] = list(range((s + 1) * m - 1, s * m - 1, -1))
                self.partial_free[g] += m
                self.used[g][s] = 0
            s = next(iter(partial))
            p = partial[s].pop()
            if not partial[s]:
                del partial[s]
            self.partial_free[g] -= 1
            self.used[g][s] += 1
            self.refs[g][p] = 1
            pages.append(p)
        return pages

    def share(self, g: int, page: int) -> None:
        if self.refs[g][page] == 0:
            raise RuntimeError(f"page {page} shared while free")
        self.refs[g][page] += 1

    def free(self, g: int, pages: list[int]) -> None:
        m, refs = self.per_super[g], self.refs[g]
        for p in pages:
            s = p // m
            if s == SCRATCH_PAGE or refs[p] == 0:
                raise RuntimeError(f"page {p} freed twice or never allocated")
            refs[p] -= 1
            if refs[p]:
                continue
            self.partial[g].setdefault(s, []).append(p)
            self.partial_free[g] += 1
            self.used[g][s] -= 1
            if self.used[g][s] == 0:
                del self.used[g][s], self.partial[g][s]
                self.partial_free[g] -= m
                self.free_supers.append(s)

    @property
    def free_layer_pages(self) -> int:
        return len(self.free_supers) * self.span + sum(f * n for f, n in zip(self.partial_free, self.group_layers))


class PageAllocator:
    """One layer group's pages. Double frees and foreign pages are bugs, so they raise."""

    def __init__(self, num_pages: int, *, space: _Superblocks | None = None, group: int = 0) -> None:
        self.space = space if space is not None else _Superblocks(num_pages, (1,))
        self.group = group
        self.layers = self.space.group_layers[group]

    @property
    def num_free(self) -> int:
        return self.space.num_free(self.group)

    @property
    def capacity(self) -> int:
        return (self.space.num_supers - 1) * self.space.per_super[self.group]

    def alloc(self, n: int) -> list[int] | None:
        return self.space.alloc(self.group, n)

    def free(self, pages: list[int]) -> None:
        self.space.free(self.group, pages)

    def share(self, page: int) -> None:
        """One more holder of an allocated page: it goes back when every holder has freed it."""
        self.space.share(self.group, page)

    def holders(self, page: int) -> int:
        return self.space.refs[self.group][page]


def grouped_allocators(
    num_layer_pages: int, full_layers: int, window_layers: int
) -> tuple[PageAllocator, PageAllocator]:
    """Allocators of the full and the windowed layers' pages, sharing `num_layer_pages` layer-pages."""
    span = math.lcm(full_layers, window_layers)
    space = _Superblocks(num_layer_pages // span, (full_layers, window_layers))
    return PageAllocator(0, space=space, group=0), PageAllocator(0, space=space, group=1)


class LayerGroups:
    """The layers' K (or V) over one storage of layer-pages [units, page_size, Hkv, D]: layer `i`, the j-th of a
    group of n layers, keeps its page p at unit p * n + j (see the module docstring).

    Attention addresses the storage itself, turning a group's page table and slots into units (`LayerCache.
    address`), with j a tensor: every layer then runs the same code on the same tensor (one compiled layer
    region for all). The cache write is the opaque `engine::write_kv_units` (kernels/paged.py): traced, every
    layer's write into the one storage became a copy of the whole pool (a 6-layer model decoded at 2.4 tok/s
    instead of 862)."""

    def __init__(self, storage: torch.Tensor, groups: list[list[int]]) -> None:
        self.storage = storage
        self.tensors = [storage]
        self._where = {layer: (len(layers), torch.tensor(j)) for layers in groups for j, layer in enumerate(layers)}

    def place(self, layer: int) -> tuple[int, torch.Tensor]:
        """(layers in its group, its index in the group as a 0-d tensor)."""
        return self._where[layer]

    def __len__(self) -> int:
        return len(self._where)


def cache_tensors(caches: list[torch.Tensor] | LayerGroups) -> list[torch.Tensor]:
    """The tensors that hold a pool's K (or V): one per layer, or the one storage behind `LayerGroups`."""
    return getattr(caches, "tensors", caches)


class KVPool:
    """Each layer's K and V page tensors. With `window_layers` (which layers page as the windowed group) both
    groups share one storage laid out in superblocks (`LayerGroups`; see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        window_layers: tuple[int, ...] = (),
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"invalid kv_cache.num_pages={num_pages}: need at least 2 (page 0 is scratch)")
        self.num_pages, self.page_size, self.window_layers = num_pages, page_size, window_layers
        unit = (page_size, kv_heads, head_dim)
        if not window_layers:
            self.k = [torch.zeros(num_pages, *unit, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(num_pages, *unit, dtype=dtype, device=device) for _ in range(num_layers)]
            return
        groups = [[i for i in range(num_layers) if i not in window_layers], list(window_layers)]
        span = math.lcm(*map(len, groups))
        self.num_layer_pages = num_pages * num_layers // span * span
        self.k, self.v = (
            LayerGroups(torch.zeros(self.num_layer_pages, *unit, dtype=dtype, device=device), groups) for _ in "kv"
        )

    def full_pages_beside(self, window_pages: int) -> int:
        """Pages of the full layers the pool can hand out while `window_pages` windowed pages are held (all of
        its pages when every layer pages alike)."""
        if not self.window_layers:
            return self.num_pages - 1
        full, windowed = len(self.k) - len(self.window_layers), len(self.window_layers)
        span = math.lcm(full, windowed)
        supers = self.num_layer_pages // span - 1 - -(-window_pages // (span // windowed))
        return max(0, supers) * (span // full)

    def allocators(self) -> tuple[PageAllocator, PageAllocator | None]:
        """The full layers' allocator, and the windowed layers' (None when every layer keeps every page)."""
        if not self.window_layers:
            return PageAllocator(self.num_pages), None
        full = len(self.k) - len(self.window_layers)
        return grouped_allocators(self.num_layer_pages, full, len(self.window_layers))
