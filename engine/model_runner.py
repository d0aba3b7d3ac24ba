"""Runs one scheduled batch through the model: builds the flattened inputs, picks eager or compiled.

Two graphs, with dynamic shapes where the attention backend can be traced symbolically (sdpa, triton; flex
gets static graphs per rounded shape). Decode-only steps (every row has one new token) trace the whole step,
attention included; on CUDA they are replayed from CUDA graphs captured at start-up (engine/cuda_graphs.py).
Steps carrying prefill chunks trace everything but attention, which stays one opaque eager op per layer
(their request lengths and prefill/decode groups change every step); compiling the rest fuses the norms,
RoPE, SiLU and residual adds that cost ~30% of an eager 512-token step here.

How and when the graphs compile is engine/step_graphs.py's business; this module plans and executes.
Under tensor parallelism rank 0 turns the batch into a `StepPlan` (plain tensors), broadcasts it, and
every rank executes the same plan on its shard of the model.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.config import CompileConfig, EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.kernels.paged import (
    DecodeStep,
    PagedAttentionBase,
    PagedBatch,
    opaque_attention_step,
)
from engine.kernels.quant_linear import FEW_ROWS, rows_alone_are_faster
from engine.kernels.row_invariant import make_batch_invariant
from engine.kv_cache import SCRATCH_PAGE, KVPool
from engine.models.loader import build_model
from engine.models.source import ModelSource
from engine.models.transformer import CausalLM, ModelConfig
from engine.outputs import TokenLogprob
from engine.overlap import fill_placeholders
from engine.parallel import TPGroup, shard_heads
from engine.sampler import top_logprobs
from engine.scheduler import ScheduledBatch
from engine.step_graphs import StepGraphs


@dataclass
class StepPlan:
    """Everything a rank needs to run one step; small enough to broadcast."""

    input_ids: torch.Tensor
    batch: PagedBatch
    logit_rows: torch.Tensor | None  # hidden rows whose logits are wanted; None: every row (decode)
    compiled: bool  # through the decode or the prefill graph


@dataclass
class _TokenRow:
    """One token of a verification step (a sequence's last known token, or a draft token after it) as a
    decode row of its own: what `_paged_batch` and the decode graphs read of a sequence."""

    num_computed_tokens: int  # the token's position
    token: int
    pages: list[int]
    window_pages: list[int]
    draft_token_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.num_computed_tokens + 1

    def scheduled_tokens(self, start: int, n: int) -> list[int]:
        return [self.token]


def _token_rows(batch: ScheduledBatch) -> ScheduledBatch:
    """A decoding batch (`is_decoding`) as a decode-only one: a row per scheduled token, in order."""
    rows = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start = seq.num_computed_tokens
        for i, token in enumerate(seq.scheduled_tokens(start, n)):
            rows.append(_TokenRow(start + i, token, seq.pages, seq.window_pages))
    return ScheduledBatch(rows, [1] * len(rows))


@dataclass
class _PromptLogprobJob:
    row: int  # index in the scheduled batch
    first: int  # logits of positions [first, last) predict prompt tokens first+1 .. last
    last: int
    offset: int  # where its logits start in the step's logits


class ModelRunner:
    """plan (rank 0: a scheduled batch -> a `StepPlan`) -> execute (every rank: the plan -> logits)."""

    def __init__(
        self,
        model: CausalLM,
        backend: PagedAttentionBase,
        page_size: int,
        device: torch.device,
        compile_cfg: CompileConfig,
        prefill_tokens: int,
        max_model_len: int,
        windowed: bool = False,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.windowed = windowed  # the windowed layers page apart (engine/kv_cache.py)
        self.device = device
        self.buckets = compile_cfg.batch_buckets
        # Padding to a bucket bounds the number of graphs where each batch size would need its own
        # (static shapes, CUDA graphs); a dynamic-shape CPU graph serves any size, so padding only costs.
        self.pad_to_buckets = device.type == "cuda" or not backend.supports_dynamic_shapes
        self.tp = model.tp
        # Quantized decode steps of more sequences than FEW_ROWS run as steps of FEW_ROWS rows where no integer
        # GEMM is fast: every row then goes through the one-row kernels, so its values do not depend on the
        # batch (kernels/quant_linear.py `rows_alone_are_faster` has the speed measured).
        # Batch-invariant mode (kernels/row_invariant.py) keeps every decode step that small, and pads every prefill
        # step (rows and logit rows) past it: a row's path then depends on its kind, not on the step's size.
        self.batch_invariant = batch_invariant
        if batch_invariant:
            make_batch_invariant(model)
        few = device.type == "cpu" and (batch_invariant or rows_alone_are_faster(model))
        self.decode_step_rows = FEW_ROWS if few else None
        self.graphs = StepGraphs(
            model,
            self._logits_at_every_token,
            self._logits_at_rows,
            backend,
            compile_cfg,
            device,
            prefill_tokens,
            self.decode_step_rows,
            self._fewest_logit_rows(compiled=True),
        )
        self.decode_graphs: DecodeGraphs | None = None
        if device.type == "cuda" and compile_cfg.cuda_graphs and self.tp.size == 1 and backend.cuda_graph_safe:
            # Captured now, and the prefill graph built now, so no request waits for a compilation.
            decode = self.graphs.decode or self._logits_at_every_token
            max_pages = -(-max_model_len // page_size)
            self.decode_graphs = DecodeGraphs(decode, backend, list(self.buckets), max_pages, page_size, device)
            if self.graphs.prefill is not None:
                self.graphs.warm_prefill(self.graphs.prefill)

    @property
    def compiled_ready(self) -> threading.Event:
        return self.graphs.ready

    def _logits_at_every_token(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions, meta))

    def _logits_at_rows(
        self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, meta: Any = None
    ) -> torch.Tensor:
        # Compiled, meta stays None: attention then reads it from `opaque_attention_step` (see
        # PagedAttentionBase.attend), so the graph holds no per-step metadata.
        return self.model.compute_logits(self.model(input_ids, positions, meta)[rows], decode_rows=False)

    # -- planning (rank 0) ---------------------------------------------------------------------------

    def _fewest_logit_rows(self, compiled: bool) -> int:
        """Logit rows a prefill step computes at least: past FEW_ROWS batch-invariant (so the head takes its
        several-row path there, as the layers do), and compiled 2 (dynamic shapes specialise sizes 0 and 1: one
        or no logit row would compile a graph of its own)."""
        if self.batch_invariant:
            return FEW_ROWS + 1
        return 2 if compiled else 0

    def _paged_batch(
        self, batch: ScheduledBatch, pad_rows: int, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PagedBatch]:
        """The step's inputs, built on the host from the sequences' lists and moved in one non-blocking copy
        (nothing here reads the device); placeholder tokens filled from `previous` on the device."""
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        window_slots: list[int] = []
        pad_index: list[int] = []
        max_q = self.backend.padded_query_len(max(batch.num_new_tokens))
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, pages = seq.num_computed_tokens, seq.pages
            ids.extend(seq.scheduled_tokens(start, n))
            positions.extend(range(start, start + n))
            slots.extend(pages[p // ps] * ps + p % ps for p in range(start, start + n))
            if self.windowed:
                held = seq.window_pages
                window_slots.extend(held[p // ps] * ps + p % ps for p in range(start, start + n))
            pad_index.extend(range(row * max_q, row * max_q + n))
        query_lens = list(batch.num_new_tokens)
        seq_lens = [s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)]
        # Padding rows (bucketed decode, batch-invariant prefill) read and write only the scratch page at position 0.
        pad_index.extend(row * max_q for row in range(len(batch.seqs), len(batch.seqs) + pad_rows))
        ids += [0] * pad_rows
        positions += [0] * pad_rows
        slots += [SCRATCH_PAGE * ps] * pad_rows
        all_lens = seq_lens + [1] * pad_rows
        width = self.backend.padded_pages(max(len(s.pages) for s in batch.seqs))
        table = [p for s in batch.seqs for p in s.pages + [SCRATCH_PAGE] * (width - len(s.pages))]
        table += [SCRATCH_PAGE] * (width * pad_rows)
        window_table = []
        if self.windowed:
            window_slots += [SCRATCH_PAGE * ps] * pad_rows
            window_table = [
                p for s in batch.seqs for p in s.window_pages + [SCRATCH_PAGE] * (width - len(s.window_pages))
            ]
            window_table += [SCRATCH_PAGE] * (width * pad_rows)
        if max_q == 1:
            pad_index = []
        parts = [ids, positions, slots, all_lens, table, pad_index, window_slots, window_table]
        if self.device.type == "cuda":  # one pinned buffer, one non-blocking copy, views of it
            flat = torch.tensor(list(itertools.chain.from_iterable(parts)), dtype=torch.long)
            flat = flat.pin_memory().to(self.device, non_blocking=True)
            ids_t, pos_t, slot_t, lens_t, table_t, pad_t, wslot_t, wtable_t = flat.split([len(p) for p in parts])
        else:  # nothing to copy; and a compiled layer region refuses inputs that are views of one tensor
            tensors = (torch.tensor(p, dtype=torch.long) for p in parts)
            ids_t, pos_t, slot_t, lens_t, table_t, pad_t, wslot_t, wtable_t = tensors
        if previous is not None and min(ids) < 0:
            ids_t = fill_placeholders(ids_t, previous)
        paged = PagedBatch(
            positions=pos_t,
            slot_mapping=slot_t,
            page_table=table_t.view(len(all_lens), width),
            seq_lens=lens_t,
            max_query_len=max_q,
            pad_index=None if max_q == 1 else pad_t,
            query_lens=query_lens + [1] * pad_rows,
            host_seq_lens=all_lens,
            window_slot_mapping=wslot_t if self.windowed else None,
            window_page_table=wtable_t.view(len(all_lens), width) if self.windowed else None,
        )
        return ids_t, paged

    def plan(
        self, batch: ScheduledBatch, previous: torch.Tensor | None = None
    ) -> tuple[StepPlan, list[int], list[_PromptLogprobJob]]:
        sampling_rows = batch.sampling_rows
        if batch.is_decode_only:
            pad = 0
            compiled = self.graphs.decode is not None
            if compiled and self.pad_to_buckets:
                b = len(batch.seqs)
                pad = self.buckets[bisect.bisect_left(self.buckets, b)] - b if b <= self.buckets[-1] else 0
            ids, paged = self._paged_batch(batch, pad, previous)
            return StepPlan(ids, paged, None, compiled), sampling_rows, []

        # A prefill step has more rows than a decode step ever has: batch-invariant (kernels/row_invariant.py), and
        # compiled, where a step of 2..FEW_ROWS tokens (a short prompt alone) took the few-row paths and compiled
        # a prefill graph of its own in the middle of a run.
        tokens = sum(batch.num_new_tokens)
        compiled = self.graphs.prefill is not None and tokens > 1
        pad = max(0, FEW_ROWS + 1 - tokens) if self.batch_invariant or compiled else 0
        ids, paged = self._paged_batch(batch, pad, previous)
        ends = [e - 1 for e in itertools.accumulate(batch.num_new_tokens)]
        # A speculating row samples at its last known token and after each draft token.
        rows = [i for r in sampling_rows for i in range(ends[r] - len(batch.seqs[r].draft_token_ids), ends[r] + 1)]
        jobs = []
        offset = 0
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            if seq.wants_prompt_logprobs:
                # Position p predicts token p + 1; collect only targets not recorded yet and inside the prompt.
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last > first:
                    jobs.append(_PromptLogprobJob(row, first, last, len(rows)))
                    rows.extend(range(offset + first - start, offset + last - start))
            offset += n
        while len(rows) < self._fewest_logit_rows(compiled):  # extra logit rows are dropped past the sampled ones
            rows.append(rows[-1] if rows else 0)
        return (
            StepPlan(ids, paged, torch.tensor(rows, dtype=torch.long, device=self.device), compiled),
            sampling_rows,
            jobs,
        )

    # -- execution (every rank) ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        if plan.logit_rows is None and (plan.compiled or self.batch_invariant):
            # Batch-invariant, an eager decode step attends through the decode kernel too: SDPA's padded call
            # over a step's decode rows depends on the longest context among them.
            meta = DecodeStep(self.backend.prepare_decode(plan.batch))
            if plan.compiled:
                return self.graphs.decode(plan.input_ids, plan.batch.positions, meta)
            with self.graphs.eager():
                return self._logits_at_every_token(plan.input_ids, plan.batch.positions, meta)
        meta = self.backend.prepare(plan.batch)
        if plan.compiled:
            with opaque_attention_step(self.backend, meta):
                return self.graphs.prefill(plan.input_ids, plan.batch.positions, plan.logit_rows)
        with self.graphs.eager():
            if plan.logit_rows is None:
                return self._logits_at_every_token(plan.input_ids, plan.batch.positions, meta)
            return self._logits_at_rows(plan.input_ids, plan.batch.positions, plan.logit_rows, meta)

    def run_as_token_rows(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits at each sequence's last scheduled token, every scheduled token run as a decode row of its own
        (`_token_rows`): a draft model catching up on the 2 tokens the target added pays a decode step of 2 rows
        instead of a prefill step (SmolLM2's int4 layers: 17.1 vs 21.4 ms, docs/performance.md, 2026-12-06)."""
        logits = self.run(_token_rows(batch))[0]
        return logits[[end - 1 for end in itertools.accumulate(batch.num_new_tokens)]]

    def run(
        self, batch: ScheduledBatch, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int], dict[int, list[TokenLogprob]]]:
        """Logits of the rows that sample this step (a speculating row's 1 + draft length of them, in order),
        which rows those are, and prompt logprobs by row. A placeholder token (overlap scheduling,
        engine/overlap.py) is the token at its index in `previous`, the step before's sampled tokens."""
        if batch.is_decoding and not batch.is_decode_only:
            # A verification runs as the decode step of one row per token, so each token's values are those a
            # plain decode step gives it (same attention kernel, same one-row products) and greedy speculation
            # stays token-identical to plain decoding. Through the prefill graph (SDPA over a sequence's several
            # queries), bfloat16 rounding parted them after 22 tokens on SmolLM2 (2026-12-05).
            return self.run(_token_rows(batch))[0], batch.sampling_rows, {}
        graphs, seqs, rows = self.decode_graphs, batch.seqs, self.decode_step_rows
        if rows is not None and batch.is_decode_only and len(seqs) > rows:
            parts = [
                ScheduledBatch(seqs[i : i + rows], batch.num_new_tokens[i : i + rows])
                for i in range(0, len(seqs), rows)
            ]
            return torch.cat([self.run(part, previous)[0] for part in parts]), batch.sampling_rows, {}
        if graphs is not None and batch.is_decode_only and graphs.bucket(len(seqs)) is not None:
            positions = [s.num_computed_tokens for s in seqs]
            tokens = [s.scheduled_tokens(p, 1)[0] for s, p in zip(seqs, positions)]
            logits = graphs.run(tokens, positions, [s.pages for s in seqs], previous)
            return logits[: len(seqs)], batch.sampling_rows, {}
        plan, sampling_rows, jobs = self.plan(batch, previous)
        if self.tp.size > 1:
            dist.broadcast_object_list([plan], src=0)
        logits = self.execute(plan)
        if plan.logit_rows is None:
            return logits[: len(batch.seqs)], sampling_rows, {}
        prompt_logprobs = {}
        for job in jobs:
            n = job.last - job.first
            seq = batch.seqs[job.row]
            targets = torch.tensor(seq.prompt_token_ids[job.first + 1 : job.last + 1], device=logits.device)
            lp = logits[job.offset : job.offset + n].log_softmax(dim=-1)
            prompt_logprobs[job.row] = top_logprobs(lp, targets, seq.params.prompt_logprobs)
        sampled = sum(1 + len(batch.seqs[r].draft_token_ids) for r in sampling_rows)
        return logits[:sampled], sampling_rows, prompt_logprobs

    def serve_rank(self) -> None:
        """Loop of a rank > 0: execute whatever rank 0 broadcasts until it sends None."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            self.execute(box[0])


def kv_heads_per_rank(mc: ModelConfig, tp: TPGroup) -> int:
    return shard_heads(mc.num_heads, mc.num_kv_heads, tp.size, tp.rank).kv_heads


def keep_freed_memory_in_heap() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel. By default blocks
    past a (moving) threshold are unmapped or trimmed when freed, so a step's large intermediates were
    page-faulted in afresh every time: with each decoder layer's compiled code allocating its own
    buffers (compile.regional), a dequantized int4 weight (7 MB for SmolLM2's MLP) per layer per step
    cost int4 32-row decode 159 vs 251 tok/s and prefill 558 vs 657 (experiments/cpu_vs_llamacpp.py,
    with MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ set instead). Peak memory is unchanged; it is
    just not handed back. Elsewhere than glibc nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    libc.mallopt(m_mmap_threshold, 32 << 20)  # blocks up to 32 MB come from the heap
    libc.mallopt(m_trim_threshold, 1 << 30)


def build_runner(
    cfg: EngineConfig, source: ModelSource, mc: ModelConfig, num_pages: int, tp: TPGroup
) -> tuple[ModelRunner, KVPool]:
    """This rank's KV pool, attention backend, model shard and runner (identical code on every rank)."""
    page_size, dtype, device = cfg.kv_cache.page_size, cfg.torch_dtype, torch.device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory_in_heap()
    windowed = windowed_layers(cfg, mc)
    kv_heads = kv_heads_per_rank(mc, tp)
    pool = KVPool(mc.num_layers, kv_heads, mc.head_dim, num_pages, page_size, dtype, device, windowed)
    backend = cfg.attention.build(k_cache=pool.k, v_cache=pool.v, page_size=page_size)
    backend.use_windows(mc.windows())
    model = build_model(source, mc, backend, dtype, device, tp, cfg.quant.build().for_placement(device.type, tp.size))
    runner = ModelRunner(
        model,
        backend,
        page_size,
        device,
        cfg.compile,
        cfg.scheduler.max_num_batched_tokens,
        max_model_len(cfg, mc, pool),
        windowed=bool(windowed),
        batch_invariant=cfg.batch_invariant,
    )
    return runner, pool


def windowed_layers(cfg: EngineConfig, mc: ModelConfig) -> tuple[int, ...]:
    """The layers that page as the windowed group (engine/kv_cache.py): the sliding ones of a model that also
    has full ones (windowed everywhere, a model's pool would need a second group of pages to free nothing
    sooner), where the backend addresses a shared storage and no CUDA graph replays fixed page tables. Empty: every
    layer keeps every page."""
    layers = tuple(i for i in range(mc.num_layers) if mc.window(i))
    possible = cfg.attention.resolve().supports_layer_groups and not (cfg.device == "cuda" and cfg.compile.cuda_graphs)
    return layers if cfg.kv_cache.window_pages and 0 < len(layers) < mc.num_layers and possible else ()


def max_model_len(cfg: EngineConfig, mc: ModelConfig, pool: KVPool) -> int:
    """The longest sequence: the configured or the model's limit, and no longer than the pool can hold on its
    own (so a lone request can always finish: with a windowed group, beside its window and one step's tokens)."""
    limit = min(cfg.model.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    page_size = cfg.kv_cache.page_size
    # A lone sequence's windowed pages: its window and one step's new tokens.
    window_pages = (
        -(-(max(mc.windows()) + cfg.scheduler.max_num_batched_tokens) // page_size) + 1 if pool.window_layers else 0
    )
    return min(limit, pool.full_pages_beside(window_pages) * page_size)
