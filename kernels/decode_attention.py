"""Decode attention (one query per row) straight from the paged cache, written for inductor.

Gathering each row's pages into a contiguous context and calling SDPA costs two full copies of K/V per
layer plus a flash kernel tuned for long queries. Written as broadcast products and reductions instead,
inductor fuses the page lookup into the loops that read K and V, so each is read once and nothing is
materialised: 2.4x faster than compiled gather+SDPA at batch 32, 144 slots, 9/3 heads (this machine).
Only worth it compiled; eagerly every intermediate would be materialised.
"""

from __future__ import annotations

import torch

from engine.kernels.fusion import stored


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    window: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B, H, D] (row b's query sits at positions[b]); caches [pages, page_size, Hkv, D];
    page_table [B, P]. Returns [B, H, D]. Slots past a row's position (padding, stale pages) are masked, and
    with `window` > 0 those `window` or more positions before it."""
    b, heads, dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    pages = page_table.shape[1]
    # Scores and softmax in fp32 whatever the cache dtype, as SDPA's CPU kernel does.
    qg = stored(q.float().view(b, 1, 1, kv_heads, group, dim) * (dim**-0.5 if scale is None else scale))
    k = k_cache[page_table].float()  # [B, P, page, Hkv, D]
    scores = (qg * k.unsqueeze(-2)).sum(-1)  # [B, P, page, Hkv, G]
    slot = torch.arange(pages * page_size, device=q.device).view(1, pages, page_size, 1, 1)
    pos = positions.view(b, 1, 1, 1, 1)
    hidden = slot > pos if window == 0 else (slot > pos) | (slot <= pos - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    # Softmax normalised after the weighted sum of V, not before: the division then runs once per output
    # element instead of once per slot inside the loop that reads V (5-7% of this kernel at batch 48).
    weights = (scores - scores.amax(dim=(1, 2), keepdim=True)).exp()
    v = v_cache[page_table].float()
    out = (weights.unsqueeze(-1) * v.unsqueeze(-2)).sum((1, 2)) / weights.sum((1, 2)).unsqueeze(-1)
    return out.reshape(b, heads, dim).to(q.dtype)
