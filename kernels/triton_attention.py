"""Paged attention as one Triton kernel for every step (prefill chunks, decode rows, both mixed), for GPUs.

Each program takes a block of one request's queries and one KV head, with the query heads that share it
(GQA: the K/V it loads serve `group` heads at once), and walks that request's pages in the pool directly:
no gather into a contiguous copy, no mask tensor, work proportional to each row's own context (a padded
page table costs nothing). A decode-only step is the case of one query per row, so the same kernel runs
inside the CUDA graphs captured for decode batches; its grid and metadata are tensors of the batch size.

Triton only behind a CUDA check (`attention=auto` picks this on CUDA). On CPU the kernel still runs under
Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it against SDPA.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.kernels.paged import LayerCache, PagedAttentionBase, PagedBatch

try:  # not part of the CPU wheel's dependencies; needed only where this backend is chosen
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,
        page_table_ptr, seq_lens_ptr, query_start_ptr, block_row_ptr, block_first_ptr,
        scale,
        stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_pt, stride_sl,
        GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DECODE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        WINDOW: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        kv_head = tl.program_id(1)
        if DECODE:  # one query per row, program = row: no block tables (a CUDA graph's metadata is just the batch)
            row = block
            first = 0
            q_start = block
            q_len = 1
        else:
            row = tl.load(block_row_ptr + block)
            first = tl.load(block_first_ptr + block)  # this block's first query, counted within its row
            q_start = tl.load(query_start_ptr + row)
            q_len = tl.load(query_start_ptr + row + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + row * stride_sl)  # strided in the CUDA graphs' static buffer
        context = seq_len - q_len  # tokens cached before this step's queries

        offs_m = tl.arange(0, BLOCK_M)
        query = first + offs_m // GROUP
        head = kv_head * GROUP + offs_m % GROUP
        valid_m = (offs_m < BLOCK_Q * GROUP) & (query < q_len)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + (q_start + query)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=valid_m[:, None],
            other=0.0,
        )
        position = context + query  # each query sees the slots up to its own position

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        kv_end = tl.minimum(seq_len, context + first + BLOCK_Q)  # causal: the block's last query's span
        kv_start = 0
        if WINDOW > 0:  # blocks wholly before the first query's window are skipped
            kv_start = tl.maximum(context + first - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        for start in range(kv_start, kv_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            valid_n = offs_n < kv_end
            page = tl.load(page_table_ptr + row * stride_pt + offs_n // PAGE_SIZE, mask=valid_n, other=0)
            in_page = offs_n % PAGE_SIZE
            k = tl.load(
                k_ptr + (page * stride_kp + in_page * stride_ks + kv_head * stride_kh)[:, None] + offs_d[None, :],
                mask=valid_n[:, None],
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            visible = valid_n[None, :] & (offs_n[None, :] <= position[:, None])
            if WINDOW > 0:
                visible = visible & (offs_n[None, :] > position[:, None] - WINDOW)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_ptr + (page * stride_vp + in_page * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
                mask=valid_n[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + (q_start + query)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=valid_m[:, None],
        )


def _block_m(group: int, block_q: int) -> int:
    """Rows of one program: block_q queries x group heads, at least 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(block_q * group))


# The op writes this step's K/V into the caches itself, and says it mutates nothing (as engine::paged_attention
# does): declared, the write was functionalized in the compiled decode graph on CUDA into a copy of every layer's
# whole cache and a copy back, 56 ms of a 60 ms step at 64 rows with a 60 GB pool (H200; 6.2 ms without). No other
# op of a step reads a layer's cache, so nothing can observe the order.
@torch.library.custom_op("engine::triton_paged_attention", mutates_args=())
def triton_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    blocks: torch.Tensor | None,
    block_q: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Write k, v [T, Hkv, D] at their slots, then attend: q [T, H, D] -> [T, H, D] over the paged caches
    [pages, page_size, Hkv, D], one program per block of queries and KV head. `blocks` None: one query per row
    (decode); else int32 [the first query of each row (B + 1), the row of each block (n), its first query within
    the row (n)], as `prepare` lays it out."""
    PagedAttentionBase.write_kv(LayerCache(k_cache, v_cache), k, v, slot_mapping)
    out = torch.empty_like(q)
    _, page_size, kv_heads, dim = k_cache.shape
    group = q.shape[1] // kv_heads
    rows = seq_lens.shape[0]
    decode = blocks is None
    if decode:
        query_start = block_row = block_first = seq_lens  # unread
        num_blocks = rows
    else:
        num_blocks = (blocks.shape[0] - rows - 1) // 2
        query_start, block_row, block_first = blocks.split([rows + 1, num_blocks, num_blocks])
    _paged_attention_kernel[(num_blocks, kv_heads)](
        q, k_cache, v_cache, out, page_table, seq_lens, query_start, block_row, block_first,
        scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), page_table.stride(0),
        seq_lens.stride(0),
        GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=dim, DECODE=decode, BLOCK_Q=block_q,
        # fp32 stays fp32 (tl.dot would take TF32 on a GPU: not token-exact against transformers in fp32)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # 64 slots per iteration: four pages' loads in flight instead of one (each slot's page is looked up)
        BLOCK_M=_block_m(group, block_q), BLOCK_N=max(64, page_size), WINDOW=window,
    )  # fmt: skip
    return out


@triton_paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, page_table, seq_lens, blocks, block_q, window, scale):
    return torch.empty_like(q)


@dataclass
class TritonStep:
    """A step's kernel metadata: the batch, and its program blocks (None in a decode-only step)."""

    batch: PagedBatch
    blocks: torch.Tensor | None
    block_q: int


class TritonAttention(PagedAttentionBase):
    """Needs tensors on a CUDA device, or Triton's interpreter (TRITON_INTERPRET=1) for CPU tensors."""

    # Queries per program in steps with prefill chunks; times the group's heads (16-128 rows of q).
    block_q = 16

    def __init__(self, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], page_size: int) -> None:
        if triton is None:
            raise RuntimeError("attention=triton needs the triton package (it comes with CUDA builds of torch)")
        super().__init__(k_cache, v_cache, page_size)

    def prepare(self, batch: PagedBatch) -> TritonStep:
        """Blocks of up to `block_q` queries per row, from the host-side query lengths: one small host-to-
        device copy, no device read."""
        lens = batch.query_lens
        if max(lens) == 1:
            return TritonStep(batch, None, 1)
        rows = [row for row, n in enumerate(lens) for _ in range(0, n, self.block_q)]
        firsts = [first for n in lens for first in range(0, n, self.block_q)]
        starts = list(itertools.accumulate(lens, initial=0))
        blocks = torch.tensor(starts + rows + firsts, dtype=torch.int32)
        if batch.positions.device.type == "cuda":
            blocks = blocks.pin_memory().to(batch.positions.device, non_blocking=True)
        return TritonStep(batch, blocks, self.block_q)

    def prepare_decode(self, batch: PagedBatch) -> PagedBatch:
        return batch

    def forward(
        self,
        cache: LayerCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: TritonStep,
        window: int = 0,
        scale: float | None = None,
    ) -> torch.Tensor:
        batch = meta.batch
        slots, table = cache.address(*batch.paging(window))
        return triton_paged_attention(
            q, k, v, cache.k, cache.v, slots, table, batch.seq_lens, meta.blocks, meta.block_q,
            window, q.shape[-1] ** -0.5 if scale is None else scale,
        )  # fmt: skip

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
        return triton_paged_attention(
            q, k, v, cache.k, cache.v, slots, table, batch.seq_lens, None, 1,
            window, q.shape[-1] ** -0.5 if scale is None else scale,
        )  # fmt: skip
