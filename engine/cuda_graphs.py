"""Decode steps on a GPU as CUDA graphs, all captured at start-up.

One graph per batch bucket, captured largest first into one memory pool, all reading one set of static
input buffers: a step's rows are laid out as [token, position, slot, length, page table (fixed width)]
so that a bucket's inputs are the first rows of one buffer and a step is one non-blocking host-to-device
copy of them, then a replay. A fixed page-table width (the longest sequence's pages) keeps one graph per
bucket instead of one per width; the attention kernel reads each row only up to its length, so the width
costs nothing. Batch 1 runs in the bucket of 2: one more row costs nothing on a GPU, and a batch of 1
would be a compilation of its own (dynamic shapes specialise size 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from engine.kernels.paged import DecodeStep, PagedAttentionBase, PagedBatch
from engine.kv_cache import SCRATCH_PAGE
from engine.overlap import fill_placeholders
from engine.progress import progress

log = logging.getLogger(__name__)
TOKEN, POSITION, SLOT, LENGTH, PAGES = 0, 1, 2, 3, 4  # columns of a row of the static buffer

DecodeFn = Callable[[torch.Tensor, torch.Tensor, DecodeStep], torch.Tensor]


def graph_buckets(buckets: list[int]) -> list[int]:
    """The configured buckets, batch 1 folded into the next (at least 2)."""
    return sorted({max(2, b) for b in buckets})


class DecodeGraphs:
    def __init__(
        self,
        decode_fn: DecodeFn,
        backend: PagedAttentionBase,
        buckets: list[int],
        max_pages: int,
        page_size: int,
        device: torch.device,
    ) -> None:
        self.buckets = graph_buckets(buckets)
        self.page_size = page_size
        self.device = device
        rows, width = self.buckets[-1], PAGES + max_pages
        # Every row starts as a padding row: it reads and writes only the scratch page at position 0.
        host = torch.zeros(rows, width, dtype=torch.long, pin_memory=device.type == "cuda")
        host[:, SLOT] = SCRATCH_PAGE * page_size
        host[:, LENGTH] = 1
        host[:, PAGES:] = SCRATCH_PAGE
        self.host = host  # pinned staging rows, filled per step
        self.rows = host.numpy()
        self.static = host.to(device)
        self.fn, self.backend = decode_fn, backend
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}
        with progress(log, f"capturing CUDA graphs for decode batches {self.buckets}"):
            self._capture_all()

    def inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, DecodeStep]:
        """The first b rows of the static buffer as the decode function's arguments."""
        s = self.static[:b]
        batch = PagedBatch(
            positions=s[:, POSITION],
            slot_mapping=s[:, SLOT],
            page_table=s[:, PAGES:],
            seq_lens=s[:, LENGTH],
            max_query_len=1,
            pad_index=None,
        )
        return s[:, TOKEN], s[:, POSITION], DecodeStep(self.backend.prepare_decode(batch))

    def _capture_all(self) -> None:
        if self.device.type != "cuda":
            # No CUDA graphs off a GPU: each bucket is called on the same static buffers instead, so the
            # layout and the padding are tested on CPU too.
            self.replays = {b: self._call_for(b) for b in self.buckets}
            return
        self.replays = {}
        pool = None
        for b in reversed(self.buckets):  # the largest first: the smaller ones fit in its memory
            ids, positions, meta = self.inputs(b)
            with torch.inference_mode():
                self.fn(ids, positions, meta)  # compiles on the first bucket, warms up the others
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.fn(ids, positions, meta)
            pool = graph.pool()
            self.replays[b] = self._replay_for(graph, logits)
        torch.cuda.synchronize(self.device)

    def _call_for(self, b: int) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return self.fn(*self.inputs(b))

        return call

    @staticmethod
    def _replay_for(graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> Callable[[], torch.Tensor]:
        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    def bucket(self, b: int) -> int | None:
        """The graph that takes b rows, or None when b is beyond the largest bucket."""
        return next((g for g in self.buckets if g >= b), None)

    def run(
        self, tokens: list[int], positions: list[int], pages: list[list[int]], previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [bucket, vocab] of one decode step of len(tokens) rows (rows past them are padding); placeholder
        tokens filled from `previous` on the device (engine/overlap.py)."""
        b = len(tokens)
        bucket = self.bucket(b)
        ps = self.page_size
        rows = self.rows
        rows[:b, TOKEN] = tokens
        rows[:b, POSITION] = positions
        rows[:b, SLOT] = [p[pos // ps] * ps + pos % ps for p, pos in zip(pages, positions)]
        rows[:b, LENGTH] = [pos + 1 for pos in positions]
        for i, row_pages in enumerate(pages):  # stale pages past a row's length are never read
            rows[i, PAGES : PAGES + len(row_pages)] = row_pages
        # Rows b..bucket keep (or get back) the padding values: only the first columns matter.
        rows[b:bucket, TOKEN:PAGES] = np.array([0, 0, SCRATCH_PAGE * ps, 1])
        rows[b:bucket, PAGES] = SCRATCH_PAGE
        self.static[:bucket].copy_(self.host[:bucket], non_blocking=True)
        if previous is not None and min(tokens) < 0:
            ids = self.static[:b, TOKEN]
            ids.copy_(fill_placeholders(ids, previous))
        return self.replays[bucket]()
