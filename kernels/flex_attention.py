"""Paged attention with FlexAttention reading the pool in place (no gather).

Keys/values are the whole pool viewed as one long sequence [1, Hkv, num_pages*page_size, D]. Each step
builds a physical-to-logical page map per batch row; the mask_mod admits a pool slot for row b only if
its page belongs to b and its logical position is <= the query's. The block mask is built once per step
and shared by all layers. FlexAttention is only fast compiled, so it always runs through torch.compile.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from engine.kernels.paged import LayerCache, PagedAttentionBase, PagedBatch

_compiled_flex = torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable(recursive=False)
def _flex_outside_caller_graph(q, k, v, block_mask, scale):
    # Inside a compiled decode step, inductor's CPU flex template cannot take K/V that are views of a
    # buffer mutated in the same graph (the cache write); splitting the graph here hands it real
    # inputs. The flex call itself is still compiled, on its own.
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


class FlexPagedAttention(PagedAttentionBase):
    supports_dynamic_shapes = False
    supports_layer_groups = False  # the pool is read as one flat sequence
    cuda_graph_safe = False  # its block mask's span is read from the page table on the host

    def __init__(
        self, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], page_size: int, kv_block_size: int = 128
    ) -> None:
        super().__init__(k_cache, v_cache, page_size)
        self.num_pages = k_cache[0].shape[0]
        self.kv_block_size = kv_block_size
        # Static shapes only (inductor's CPU flex template fails under dynamic shapes): query lengths
        # and spans are rounded to powers of two, so a bounded number of graphs covers every step.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def padded_query_len(self, longest: int) -> int:
        return 1 if longest == 1 else 1 << (longest - 1).bit_length()

    def padded_pages(self, pages: int) -> int:
        return 1 << (super().padded_pages(pages) - 1).bit_length()

    def _span(self, page_table: torch.Tensor) -> int:
        """Pages [0, span) cover every page of this step. The allocator hands out low pages first, so
        attending over this span instead of the whole pool keeps the work proportional to what is used;
        rounding to a power of two (in kv blocks) bounds the number of distinct compiled shapes."""
        blocks = -(-(int(page_table.max()) + 1) * self.page_size // self.kv_block_size)
        span = (1 << (blocks - 1).bit_length()) * self.kv_block_size // self.page_size
        return max(1, min(span, self.num_pages))

    def prepare(self, batch: PagedBatch) -> tuple[PagedBatch, dict[int, BlockMask]]:
        """The batch and one block mask per window (0: the whole context), shared by every layer. A window's
        mask also lets the kernel skip the blocks that lie wholly before it."""
        b, pages = batch.page_table.shape
        device = batch.positions.device
        span = self._span(batch.page_table)
        logical = torch.arange(pages, device=device).expand(b, pages)
        # Only pages the row really uses: padding entries point at the scratch page and must not map.
        used = logical < ((batch.seq_lens + self.page_size - 1) // self.page_size).unsqueeze(1)
        phys_to_logical = torch.full((b, span), -1, dtype=torch.long, device=device)
        phys_to_logical.scatter_(1, torch.where(used, batch.page_table, 0), torch.where(used, logical, -1))
        # The scatter above may have written -1 over page 0 for rows that do not own it, which is right.
        q_pos = self.query_positions(batch)
        ps = self.page_size

        def mask_mod(window):
            def visible(b_idx, h_idx, q_idx, kv_idx):
                page = phys_to_logical[b_idx, kv_idx // ps]
                pos, query = page * ps + kv_idx % ps, q_pos[b_idx, q_idx]
                seen = (page >= 0) & (pos <= query)
                return seen & (pos > query - window) if window else seen

            return visible

        blocks = (128, self.kv_block_size)
        masks = {
            w: create_block_mask(mask_mod(w), b, None, batch.max_query_len, span * ps, device=device, BLOCK_SIZE=blocks)
            for w in (0, *self.windows)
        }
        return batch, masks

    def forward(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: tuple[PagedBatch, dict[int, BlockMask]],
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        batch, masks = meta
        block_mask = masks[window]
        self.write_kv(cache, k, v, batch.slot_mapping)
        kc, vc = cache.k, cache.v
        span = block_mask.seq_lengths[1]
        keys = kc.view(1, -1, *kc.shape[2:])[:, :span].transpose(1, 2)
        values = vc.view(1, -1, *vc.shape[2:])[:, :span].transpose(1, 2)
        out = _flex_outside_caller_graph(self.pad_queries(q, batch), keys, values, block_mask, scale)
        return self.unpad(out, batch)

    def decode(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: tuple[PagedBatch, dict[int, BlockMask]],
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        # The block masks already cover one query per row; nothing to specialise.
        return self.forward(cache, q, k, v, meta, window, scale)
