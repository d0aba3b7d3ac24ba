"""Runs one scheduled batch through the model: builds the flattened inputs, picks eager or compiled.

Decode-only steps (every row has one new token) go through `torch.compile`; their batch is padded up to
a bucket so a handful of graphs serve every batch size. Steps carrying prefill chunks run eagerly:
their shapes vary every step and their time is dominated by large GEMMs anyway.
"""
from __future__ import annotations

import bisect
import logging
from typing import Any

import torch

from engine.kv_cache import SCRATCH_PAGE
from engine.models.transformer import CausalLM
from engine.outputs import TokenLogprob
from engine.sampler import top_logprobs
from engine.scheduler import ScheduledBatch
from kernels.paged import PagedAttentionBase, PagedBatch

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, backend: PagedAttentionBase, page_size: int, device: torch.device,
                 compile_cfg: Any) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.buckets = sorted(compile_cfg.batch_buckets)
        self.compiled = None
        if compile_cfg.enabled:
            if compile_cfg.freezing:
                torch._inductor.config.freezing = True
            # Bucketed batch sizes and the growing context length would each cost a recompile under
            # static shapes; dynamic shapes serve them with one graph (plus size-1 specialisations).
            # Backends that cannot be traced symbolically get one static graph per (bucket, width).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled = torch.compile(self._logits_at_every_token, mode=compile_cfg.mode,
                                          dynamic=True if backend.supports_dynamic_shapes else False)

    def _logits_at_every_token(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions, meta))

    # ------------------------------------------------------------------------------------------------

    def _build(self, batch: ScheduledBatch, pad_rows: int) -> tuple[torch.Tensor, PagedBatch]:
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        pad_index: list[int] = []
        max_q = self.backend.padded_query_len(max(batch.num_new_tokens))
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            pad_index.extend(range(row * max_q, row * max_q + n))
        seq_lens = [s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)]
        # Padding rows (bucketed decode) read and write only the scratch page at position 0.
        ids += [0] * pad_rows
        positions += [0] * pad_rows
        seq_lens += [1] * pad_rows
        width = max(2, max(len(s.pages) for s in batch.seqs))  # >= 2 keeps dynamic shapes off the size-1 path
        width = 1 << (width - 1).bit_length()  # power of two: fewer distinct shapes to compile for
        table = [s.pages + [SCRATCH_PAGE] * (width - len(s.pages)) for s in batch.seqs]
        table += [[SCRATCH_PAGE] * width] * pad_rows

        dev = self.device
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        table_t = torch.tensor(table, dtype=torch.long, device=dev)
        rows = torch.tensor([r for r, n in enumerate(batch.num_new_tokens) for _ in range(n)] + list(
            range(len(batch.seqs), len(batch.seqs) + pad_rows)), dtype=torch.long, device=dev)
        slots = table_t[rows, pos_t // ps] * ps + pos_t % ps
        paged = PagedBatch(
            positions=pos_t, slot_mapping=slots, page_table=table_t,
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev), max_query_len=max_q,
            pad_index=None if max_q == 1 else torch.tensor(pad_index, dtype=torch.long, device=dev))
        return torch.tensor(ids, dtype=torch.long, device=dev), paged

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], dict[int, list[TokenLogprob]]]:
        """Logits of the rows that sample this step, which rows those are, and prompt logprobs by row."""
        sampling_rows = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                         if s.num_computed_tokens + n == s.num_tokens]
        if batch.is_decode_only:
            pad = 0
            if self.compiled is not None:
                b = len(batch.seqs)
                pad = self.buckets[bisect.bisect_left(self.buckets, b)] - b if b <= self.buckets[-1] else 0
            ids, paged = self._build(batch, pad)
            meta = self.backend.prepare(paged)
            forward = self.compiled or self._logits_at_every_token
            return forward(ids, paged.positions, meta)[:len(batch.seqs)], sampling_rows, {}

        ids, paged = self._build(batch, 0)
        hidden = self.model(ids, paged.positions, self.backend.prepare(paged))
        ends = torch.tensor(batch.num_new_tokens).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[ends[sampling_rows].to(self.device)])
        return logits, sampling_rows, self._prompt_logprobs(batch, hidden)

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> dict[int, list[TokenLogprob]]:
        """Logprob of each prompt token given those before it, for rows that asked and are in their prompt."""
        found: dict[int, list[TokenLogprob]] = {}
        offset = 0
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            if seq.wants_prompt_logprobs:
                # Position p predicts token p + 1; collect only targets not recorded yet and inside the prompt.
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last > first:
                    h = hidden[offset + first - start: offset + last - start]
                    targets = torch.tensor(seq.prompt_token_ids[first + 1:last + 1], device=self.device)
                    logprobs = self.model.compute_logits(h).log_softmax(dim=-1)
                    found[row] = top_logprobs(logprobs, targets, seq.params.prompt_logprobs)
            offset += n
        return found
