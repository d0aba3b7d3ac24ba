"""The paged attention interface (`attention=` picks an implementation): the per-step batch layout,
the three paths a backend provides (prefill/mixed steps, compiled decode steps, the opaque op of the
compiled prefill graph) and the K/V cache write they share."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


@dataclass
class PagedBatch:
    """Where each flattened token of a step sits: its request row, its position and its cache slot."""

    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] page * page_size + offset where its K/V is written
    page_table: torch.Tensor  # [B, P] physical page of each logical page (0-padded)
    seq_lens: torch.Tensor  # [B] tokens with K/V once this step is done
    max_query_len: int
    pad_index: torch.Tensor | None  # [T] row * max_query_len + offset; None when every row has one token
    # The rows' query and sequence lengths on the host, for backends that plan a step's calls there (reading
    # them back from the device would wait for it). Compiled decode steps never read them.
    query_lens: list[int] | None = None
    host_seq_lens: list[int] | None = None
    # The windowed layers' own slots and pages (engine/kv_cache.py); None when every layer pages alike.
    window_slot_mapping: torch.Tensor | None = None
    window_page_table: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    def paging(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot mapping and page table of a layer with this window (0: a full layer)."""
        if window and self.window_page_table is not None:
            return self.window_slot_mapping, self.window_page_table
        return self.slot_mapping, self.page_table


class LayerCache(NamedTuple):
    """One layer's K and V pages, [pages, page_size, Hkv, D] each; or, where layer groups share a pool
    (engine/kv_cache.py `LayerGroups`), the shared storage [units, page_size, Hkv, D] with the layer's place in
    its group, which `address` turns the group's pages into."""

    k: torch.Tensor
    v: torch.Tensor
    group_layers: int = 1
    index: torch.Tensor | None = None  # 0-d: the layer's index in its group; None: k and v are its own

    def address(self, slot_mapping: torch.Tensor, page_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots and page table in this cache's own indexing (a group's page p is unit p * n + j)."""
        if self.index is None:
            return slot_mapping, page_table
        n, j, page_size = self.group_layers, self.index, self.k.shape[1]
        units = (slot_mapping // page_size * n + j) * page_size + slot_mapping % page_size
        return units, page_table * n + j


@dataclass
class DecodeStep:
    """Metadata of a compiled decode-only step (one new token per row); `attend` routes it to `decode`."""

    meta: Any


class PagedAttentionBase(ABC):
    """Holds the pool's per-layer tensors; subclasses turn a PagedBatch into attention over them.

    A step's metadata comes from `prepare` (or `prepare_decode` for the compiled decode graph), built
    once per step outside the per-layer loop; `attend` picks the path from what it is given.
    """

    supports_dynamic_shapes = True  # may a compiled caller trace it with symbolic sizes?
    # May windowed layers page apart from full ones (PagedBatch.paging, LayerCache.address: the groups share one
    # storage)? A backend that reads a layer's pages as one flat sequence cannot.
    supports_layer_groups = True
    cuda_graph_safe = True  # may a decode step through it be captured in a CUDA graph (no host reads)?
    # Does a prompt row's attention depend only on its sequence and chunk, not on the other rows of the step
    # (batch_invariant=true needs it; kernels/row_invariant.py)?
    batch_invariant = False

    def __init__(self, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], page_size: int) -> None:
        self.k_cache, self.v_cache, self.page_size = k_cache, v_cache, page_size
        self.windows: tuple[int, ...] = ()

    def use_windows(self, windows: tuple[int, ...]) -> None:
        """The model's sliding windows (its layers attend with one of them, or with 0: the whole context), so
        that `prepare` can build each one's masks once per step. A backend that cannot mask to a window
        refuses here, at start-up."""
        self.windows = tuple(windows)

    def padded_query_len(self, longest: int) -> int:
        """Row length L for a step whose longest query has `longest` tokens."""
        return longest

    def padded_pages(self, pages: int) -> int:
        """Page-table width for a step whose longest row has `pages` pages. At least 2 keeps dynamic
        shapes off the size-1 specialisation; backends compiled with static shapes round further."""
        return max(2, pages)

    @abstractmethod
    def prepare(self, batch: PagedBatch) -> Any:
        """Metadata for `forward`: any step, rows of any query length, run eagerly or as the opaque op."""

    def prepare_decode(self, batch: PagedBatch) -> Any:
        """Metadata for `decode` (every row has one new token)."""
        return self.prepare(batch)

    def layer_cache(self, layer: int) -> LayerCache:
        place = getattr(self.k_cache, "place", None)
        if place is not None:  # layer groups sharing one storage
            return LayerCache(self.k_cache.storage, self.v_cache.storage, *place(layer))
        return LayerCache(self.k_cache[layer], self.v_cache[layer])

    @abstractmethod
    def forward(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Any,
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Write this step's K/V and attend: [T, H, D] flattened queries of any mix of rows -> [T, H, D].
        `window` > 0: a query sees only the last `window` positions (itself included); `scale`: the softmax
        scale, None for 1/sqrt(D)."""

    @abstractmethod
    def decode(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Any,
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        """`forward` for one query per row, traced into the compiled decode graph."""

    def attend(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Any,
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention for one layer. `meta` is None inside a compiled prefill graph: there attention is one
        opaque op per layer that finds this step's metadata in `opaque_attention_step`, so the graph
        around it (GEMMs, norms, RoPE, MLP) compiles once for every step shape while the varying,
        data-dependent attention (request lengths, prefill/decode groups) stays eager."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if meta is None:
            return torch.ops.engine.paged_attention(q, k, v, cache.k, cache.v, window, scale, *cache[2:])
        if isinstance(meta, DecodeStep):
            return self.decode(cache, q, k, v, meta.meta, window, scale)
        return self.forward(cache, q, k, v, meta, window, scale)

    @staticmethod
    def write_kv(
        cache: LayerCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> torch.Tensor | None:
        """Write this step's K/V at their slots. Into a storage that layer groups share it returns a token (0)
        that the reads must depend on (add it to the page table): see `write_kv_units`."""
        kc, vc = cache.k, cache.v
        if cache.index is not None:
            return torch.ops.engine.write_kv_units(kc, vc, slot_mapping, k, v)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slot_mapping, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slot_mapping, v.to(vc.dtype))
        return None

    @staticmethod
    def pad_queries(q: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """[T, H, D] flattened queries -> [B, H, L, D] rows, zero-padded to the longest query."""
        b, length = batch.batch_size, batch.max_query_len
        if batch.pad_index is not None:
            q = q.new_zeros(b * length, *q.shape[1:]).index_copy(0, batch.pad_index, q)
        return q.view(b, length, *q.shape[1:]).transpose(1, 2)

    @staticmethod
    def unpad(out: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """[B, H, L, D] -> [T, H, D], dropping padding."""
        out = out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])
        return out if batch.pad_index is None else out.index_select(0, batch.pad_index)

    @staticmethod
    def query_positions(batch: PagedBatch) -> torch.Tensor:
        """[B, L] position of each padded query slot; padding gets 0 so its row is never fully masked."""
        if batch.pad_index is None:
            return batch.positions.view(batch.batch_size, -1)
        pos = batch.positions.new_zeros(batch.batch_size * batch.max_query_len)
        return pos.index_copy(0, batch.pad_index, batch.positions).view(batch.batch_size, -1)


# The K/V write into a storage that layer groups share, opaque to the compiler. Traced as index_copy_, every
# layer's write into the one graph input made inductor copy the whole pool per decode step (a 6-layer model at 19
# tok/s instead of 862). Declared free of mutations, the write is ordered before the reads by data instead: it
# returns a 0 the reads add to their page table. Defined through torch.library's low-level API, not `custom_op`,
# whose Python wrappers cost ~25 us a call (52 against 30 us, one thread, 2026-12-07): Gemma 3's decode step
# writes 18 layers this way.
_library = torch.library.Library("engine", "FRAGMENT")
_library.define("write_kv_units(Tensor k_store, Tensor v_store, Tensor slots, Tensor k, Tensor v) -> Tensor")


def write_kv_units(
    k_store: torch.Tensor, v_store: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    k_store.view(-1, *k_store.shape[2:]).index_copy_(0, slots, k.to(k_store.dtype))
    v_store.view(-1, *v_store.shape[2:]).index_copy_(0, slots, v.to(v_store.dtype))
    return slots.new_zeros(())


_library.impl("write_kv_units", write_kv_units, "CompositeExplicitAutograd")


@torch.library.register_fake("engine::write_kv_units")
def _(
    k_store: torch.Tensor, v_store: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    return slots.new_empty(())


_step = threading.local()  # per thread: a warm-up thread may run a graph while the main thread steps


@contextmanager
def opaque_attention_step(backend: PagedAttentionBase, meta: Any) -> Iterator[None]:
    """Makes `meta` the metadata the opaque attention op uses while a compiled prefill graph runs."""
    _step.current = (backend, meta)
    try:
        yield
    finally:
        _step.current = None


# mutates_args is empty although the op writes `k_cache`/`v_cache`: in the compiled prefill graph no other
# op reads a layer's cache (the next read is this layer's op in the next step), so no reordering can observe
# the write, and the compiler is spared functionalizing a write into the whole pool.
@torch.library.custom_op("engine::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    window: int,
    scale: float,
    group_layers: int = 1,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    step = getattr(_step, "current", None)
    if step is None:
        raise RuntimeError("engine::paged_attention ran outside `opaque_attention_step`: no step metadata")
    backend, meta = step
    cache = LayerCache(k_cache, v_cache, group_layers, index)
    return backend.forward(cache, q, k, v, meta, window, scale).contiguous()


@paged_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    window: int,
    scale: float,
    group_layers: int = 1,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    return q.new_empty(q.shape)
