"""Paged attention through scaled_dot_product_attention.

Each call gathers its rows' pages into a contiguous [B, Hkv, P*page_size, D] view of their context; a
boolean mask (position <= query position) covers causality, padding and stale slots at once, and a whole
prompt (nothing cached before it) is masked by SDPA itself as causal. A sliding layer's mask also hides
the slots `window` or more positions back (one mask per window, built once per step). GQA is left to SDPA
(`enable_gqa`), which measured ~15x faster here than repeating K/V heads. Compiled decode steps (one query per row) skip
the gather and the mask: `decode` runs `paged_decode_attention`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.paged import LayerCache, PagedAttentionBase, PagedBatch


@dataclass
class Part:
    """Rows attended by one SDPA call: `tokens` (None: every token of the step) with their sub-batch, and
    the mask of each window (0: the whole context); a mask is None when the rows are whole prompts (nothing
    cached before them) that the window does not cut, which SDPA masks as causal."""

    tokens: torch.Tensor | slice | None
    batch: PagedBatch
    masks: dict[int, torch.Tensor | None]


class SDPAAttention(PagedAttentionBase):
    batch_invariant = True  # one call per set of equal chunks; each (row, head) of a call computed on its own

    def prepare(self, batch: PagedBatch) -> tuple[PagedBatch, list[Part]]:
        """The batch and the SDPA calls it takes: one per set of prefill chunks of equal length and context,
        and one for the single-token rows. Padded to the longest chunk and masked, a step's ragged prompts
        spent most of the call on padding and masked scores (prompts of 40/120/200/250 tokens: 5.3 ms per
        layer in one padded call, 2.9 ms in one call each). Single-token rows (decode rows of a mixed step)
        share one padded call: padded with a chunk, each would carry a whole chunk of padded queries (a
        512-token step with 47 decode rows ran 2x slower that way)."""
        if batch.pad_index is None:
            return batch, [Part(None, batch, self._masks(batch))]
        query_lens, seq_lens = batch.query_lens, batch.host_seq_lens
        starts = list(itertools.accumulate([0, *query_lens]))
        shapes: dict[tuple[int, int], list[int]] = {}
        for row, n in enumerate(query_lens):
            shapes.setdefault((n, seq_lens[row]) if n > 1 else (1, 0), []).append(row)
        return batch, [self._part(batch, rows, starts, seq_lens) for rows in shapes.values()]

    def _part(self, batch: PagedBatch, rows: list[int], starts: list[int], seq_lens: list[int]) -> Part:
        """The call for `rows`, which all have the same number of new tokens (and, beyond one, the same
        context), so none needs padding. Sizes come from the host-side lists: no device reads."""
        n = starts[rows[0] + 1] - starts[rows[0]]
        dev = batch.positions.device
        if len(rows) == 1:
            tokens = slice(starts[rows[0]], starts[rows[0]] + n)
        else:
            tokens = torch.tensor([t for r in rows for t in range(starts[r], starts[r] + n)], device=dev)
        row_ids = torch.tensor(rows, device=dev)
        pages = -(-max(seq_lens[r] for r in rows) // self.page_size)
        width = pages if n > 1 else self.padded_pages(pages)
        windowed = batch.window_page_table is not None
        sub = PagedBatch(
            positions=batch.positions[tokens],
            slot_mapping=batch.slot_mapping[tokens],
            page_table=batch.page_table[row_ids, :width],
            seq_lens=batch.seq_lens[row_ids],
            max_query_len=n,
            pad_index=None,
            window_slot_mapping=batch.window_slot_mapping[tokens] if windowed else None,
            window_page_table=batch.window_page_table[row_ids, :width] if windowed else None,
        )
        whole_prompts = n > 1 and seq_lens[rows[0]] == n
        return Part(tokens, sub, self._masks(sub, causal_up_to=n if whole_prompts else 0))

    def prepare_decode(self, batch: PagedBatch) -> PagedBatch:
        return batch

    def decode(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: PagedBatch,
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        slots, table = cache.address(*batch.paging(window))
        written = self.write_kv(cache, k, v, slots)
        if written is not None:  # the reads come after the write (see write_kv)
            table = table + written
        return paged_decode_attention(q, cache.k, cache.v, table, batch.positions, window, scale)

    def _masks(self, batch: PagedBatch, causal_up_to: int = 0) -> dict[int, torch.Tensor | None]:
        """Each window's mask; with `causal_up_to` (whole prompts of that length) None wherever SDPA's causal
        masking is the same thing (no window, or one the prompts fit in)."""
        return {
            w: None if causal_up_to and (w == 0 or causal_up_to <= w) else self._mask(batch, w)
            for w in (0, *self.windows)
        }

    def _mask(self, batch: PagedBatch, window: int) -> torch.Tensor:
        """[B, 1, L, S]: a slot is visible up to the query's own position (causality, padding, stale slots),
        and with a window from `window` - 1 positions before it."""
        context = batch.page_table.shape[1] * self.page_size
        kv_pos = torch.arange(context, device=batch.positions.device).view(1, 1, -1)
        q_pos = self.query_positions(batch).unsqueeze(-1)
        visible = kv_pos <= q_pos
        if window:
            visible &= kv_pos > q_pos - window
        return visible.unsqueeze(1)

    def _gather(self, cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, P*page_size, D] context of each row. index_select over whole pages measured ~6x
        faster here than advanced indexing (cache[page_table])."""
        b, pages = page_table.shape
        rows = cache.view(cache.shape[0], -1).index_select(0, page_table.flatten())
        return rows.view(b, pages * self.page_size, *cache.shape[2:]).transpose(1, 2)

    def forward(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: tuple[PagedBatch, list[Part]],
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        batch, parts = meta
        self.write_kv(cache, k, v, cache.address(*batch.paging(window))[0])
        if parts[0].tokens is None:
            return self._attend(cache, q, parts[0], window, scale)
        out = torch.empty_like(q)
        for part in parts:
            out[part.tokens] = self._attend(cache, q[part.tokens], part, window, scale)
        return out

    def _attend(self, cache: LayerCache, q: torch.Tensor, part: Part, window: int, scale: float | None) -> torch.Tensor:
        batch, mask = part.batch, part.masks[window]
        table = cache.address(*batch.paging(window))[1]
        keys = self._gather(cache.k, table)
        values = self._gather(cache.v, table)
        if mask is None or part.masks[0] is None:  # whole prompts: each row's context is its queries
            keys, values = keys[:, :, : batch.max_query_len], values[:, :, : batch.max_query_len]
            mask = None if mask is None else mask[..., : batch.max_query_len]
        out = F.scaled_dot_product_attention(
            self.pad_queries(q, batch),
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
            scale=scale,
        )
        return self.unpad(out, batch)
