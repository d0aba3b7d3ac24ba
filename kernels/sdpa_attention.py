"""Paged attention with one scaled_dot_product_attention call per layer.

Each row's pages are gathered into a contiguous [B, Hkv, P*page_size, D] view of its context; a
boolean mask (position <= query position) covers causality, padding and stale slots at once. GQA is
left to SDPA (`enable_gqa`), which measured ~15x faster here than repeating K/V heads. Compiled
decode steps (one query per row) skip the gather and use `paged_decode_attention` instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.decode_attention import paged_decode_attention
from kernels.paged import PagedAttentionBase, PagedBatch


class SDPAAttention(PagedAttentionBase):
    def prepare(self, batch: PagedBatch) -> tuple[PagedBatch, torch.Tensor]:
        context = batch.page_table.shape[1] * self.page_size
        kv_pos = torch.arange(context, device=batch.positions.device)
        mask = kv_pos.view(1, 1, -1) <= self.query_positions(batch).unsqueeze(-1)  # [B, L, S]
        return batch, mask.unsqueeze(1)

    def _gather(self, cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, P*page_size, D] context of each row. index_select over whole pages measured ~6x
        faster here than advanced indexing (cache[page_table])."""
        b, pages = page_table.shape
        rows = cache.view(cache.shape[0], -1).index_select(0, page_table.flatten())
        return rows.view(b, pages * self.page_size, *cache.shape[2:]).transpose(1, 2)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: tuple[PagedBatch, torch.Tensor]) -> torch.Tensor:
        batch, mask = meta
        self.write_kv(layer, k, v, batch.slot_mapping)
        if batch.pad_index is None and torch.compiler.is_compiling():
            return paged_decode_attention(q, self.k_cache[layer], self.v_cache[layer], batch.page_table,
                                          batch.positions)
        keys = self._gather(self.k_cache[layer], batch.page_table)
        values = self._gather(self.v_cache[layer], batch.page_table)
        out = F.scaled_dot_product_attention(self.pad_queries(q, batch), keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=mask, enable_gqa=True)
        return self.unpad(out, batch)
