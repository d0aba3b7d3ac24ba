"""Runs one scheduled batch through the model: builds the flattened inputs, picks eager or compiled.

Two graphs, both with dynamic shapes on CPU. Decode-only steps (every row has one new token) trace the
whole step, attention included (on CUDA their batch is padded up to a bucket, one CUDA graph each).
Steps carrying prefill chunks trace everything but attention, which stays one opaque eager op per layer
(their request lengths and prefill/decode groups change every step); compiling the rest fuses the norms,
RoPE, SiLU and residual adds that cost ~30% of an eager 512-token step here.

Under tensor parallelism rank 0 turns the batch into a `StepPlan` (plain tensors), broadcasts it, and
every rank executes the same plan on its shard of the model.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from engine.kv_cache import SCRATCH_PAGE, KVPool
from engine.models.loader import build_model
from engine.models.source import ModelSource
from engine.models.transformer import CausalLM, ModelConfig
from engine.outputs import TokenLogprob
from engine.parallel import TPGroup, shard_heads
from engine.sampler import top_logprobs
from engine.scheduler import ScheduledBatch
from kernels.paged import PagedAttentionBase, PagedBatch, opaque_attention_step

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """Everything a rank needs to run one step; small enough to broadcast."""

    input_ids: torch.Tensor
    batch: PagedBatch
    logit_rows: torch.Tensor | None  # hidden rows whose logits are wanted; None: every row (decode)
    compiled: bool                   # through the decode or the prefill graph


@dataclass
class _PromptLogprobJob:
    row: int               # index in the scheduled batch
    first: int             # logits of positions [first, last) predict prompt tokens first+1 .. last
    last: int
    offset: int            # where its logits start in the step's logits


class ModelRunner:
    def __init__(self, model: CausalLM, backend: PagedAttentionBase, page_size: int, device: torch.device,
                 compile_cfg: Any, prefill_tokens: int) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.buckets = sorted(compile_cfg.batch_buckets)
        # Padding to a bucket bounds the number of graphs where each batch size would need its own
        # (static shapes, CUDA graphs); a dynamic-shape CPU graph serves any size, so padding only costs.
        self.pad_to_buckets = device.type == "cuda" or not backend.supports_dynamic_shapes
        self.tp = model.tp
        self.prefill_tokens = prefill_tokens  # a full chunk: the shape the prefill graph is tuned for
        # Set only once usable (a background warm-up assigns them when it is done); None: eager.
        self.compiled = None          # decode graph
        self.compiled_prefill = None  # prefill graph
        self.compiled_ready = threading.Event()  # set once both are assigned
        if compile_cfg.enabled:
            if compile_cfg.warmup not in ("lazy", "background"):
                raise ValueError(f"invalid compile.warmup={compile_cfg.warmup!r}: expected lazy or background")
            # Under tensor parallelism every rank must compile in the same step (the graphs hold
            # collectives), so ranks compile when rank 0's first compiled plan arrives. On CUDA, compiling
            # and capturing graphs on one thread while another runs eager steps segfaulted (H200, torch
            # 2.11), so there too the graphs are built by the first decode steps.
            if compile_cfg.warmup == "background" and self.tp.size == 1 and device.type != "cuda":
                threading.Thread(target=self.warm_up, args=(compile_cfg,), name="compile-warmup", daemon=True).start()
            else:
                self.compiled, self.compiled_prefill = self._compile(compile_cfg)
                self.compiled_ready.set()

    def _compile(self, compile_cfg: Any) -> tuple[Any, Any]:
        """The decode graph and the prefill graph (None when compile.prefill is off). torch.compile is lazy:
        each compiles on its first call."""
        # Bucketed batch sizes and the growing context length would each cost a recompile under static
        # shapes; dynamic shapes serve them with one graph (plus size-1 specialisations). Backends that
        # cannot be traced symbolically get one static graph per (bucket, width).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # The KV pool never changes shape. Left symbolic, "duck sizing" gave a batch of 2 (or 16) the symbol
        # of the KV head count (or page size), which the cache write then pinned: the "dynamic" graph only
        # served that one batch size and the next size compiled for minutes in the middle of a run.
        for cache in (*self.backend.k_cache, *self.backend.v_cache):
            torch._dynamo.mark_static(cache)
        torch.fx.experimental._config.use_duck_shape = False  # equal sizes of different inputs stay apart
        # Left unspecialised, every RMSNorm's eps (a float attribute) became a graph input that each call
        # wrapped in a tensor: 61 `torch.as_tensor` calls per SmolLM2 step, ~0.5 ms of a 27 ms batch-1 step.
        # The graphs take no float that changes between calls.
        torch._dynamo.config.specialize_float = True
        options = compile_options(compile_cfg, self.device)
        decode = torch.compile(self._logits_at_every_token, **options,
                               dynamic=True if self.backend.supports_dynamic_shapes else False)
        if not compile_cfg.prefill:
            return decode, None
        # CUDA graphs would record one graph per token count; there the prefill graph only fuses kernels.
        return decode, torch.compile(self._logits_at_rows, **({} if self.device.type == "cuda" else options),
                                     dynamic=True)

    def warm_up(self, compile_cfg: Any) -> None:
        """Build the decode graphs (the smallest bucket, and the dynamic one for the others) and the prefill
        graph (at a full chunk) on rows that touch only the scratch page, then let steps use them. Runs on
        its own thread while steps run eagerly, so a server answers within seconds instead of after minutes
        of compilation (even setting up torch.compile, which imports inductor, is left to this thread: 2 s
        of start-up)."""
        start = time.perf_counter()
        # Tracing and lowering hold the GIL for long stretches, while an eager step releases it at every
        # torch op and then waits out the switch interval to get it back: at the default 5 ms a 0.7 s
        # first answer took 12 s. A short interval bounds that wait for as long as compilation runs.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            compiled, compiled_prefill = self._compile(compile_cfg)
            with torch.inference_mode():
                for b in sorted({self.buckets[0], min(self.buckets[-1], 8)}):
                    batch = self._scratch_batch(b, 1)
                    compiled(batch.positions, batch.positions, self.backend.prepare(batch))
                if compiled_prefill is not None:
                    batch = self._scratch_batch(1, self.prefill_tokens)
                    with opaque_attention_step(self.backend, self.backend.prepare(batch)):
                        compiled_prefill(batch.positions, batch.positions, batch.positions[-2:])
        except Exception:
            log.exception("compiling the step graphs failed; steps stay eager")
            return
        finally:
            sys.setswitchinterval(switch_interval)
        self.compiled, self.compiled_prefill = compiled, compiled_prefill
        self.compiled_ready.set()
        log.info("step graphs compiled in %.0f s; steps now run compiled", time.perf_counter() - start)

    def _scratch_batch(self, rows: int, tokens: int) -> PagedBatch:
        """`rows` rows of `tokens` new tokens each that read and write only the scratch page."""
        dev = self.device
        positions = torch.arange(tokens, device=dev).repeat(rows)
        width = self.backend.padded_pages(-(-tokens // self.page_size))
        length = self.backend.padded_query_len(tokens)
        pad_index = None
        if length > 1:
            pad_index = torch.arange(rows, device=dev).repeat_interleave(tokens) * length + positions
        return PagedBatch(positions=positions, slot_mapping=SCRATCH_PAGE * self.page_size + positions % self.page_size,
                          page_table=torch.full((rows, width), SCRATCH_PAGE, dtype=torch.long, device=dev),
                          seq_lens=torch.full((rows,), tokens, dtype=torch.long, device=dev),
                          max_query_len=length, pad_index=pad_index)

    def _logits_at_every_token(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions, meta))

    def _logits_at_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                        meta: Any = None) -> torch.Tensor:
        # Compiled, meta stays None: attention then reads it from `opaque_attention_step` (see
        # PagedAttentionBase.attend), so the graph holds no per-step metadata.
        return self.model.compute_logits(self.model(input_ids, positions, meta)[rows])

    # -- planning (rank 0) ---------------------------------------------------------------------------

    def _paged_batch(self, batch: ScheduledBatch, pad_rows: int) -> tuple[torch.Tensor, PagedBatch]:
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
        width = self.backend.padded_pages(max(len(s.pages) for s in batch.seqs))
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

    def plan(self, batch: ScheduledBatch) -> tuple[StepPlan, list[int], list[_PromptLogprobJob]]:
        sampling_rows = batch.sampling_rows
        if batch.is_decode_only:
            pad = 0
            compiled = self.compiled is not None
            if compiled and self.pad_to_buckets:
                b = len(batch.seqs)
                pad = self.buckets[bisect.bisect_left(self.buckets, b)] - b if b <= self.buckets[-1] else 0
            ids, paged = self._paged_batch(batch, pad)
            return StepPlan(ids, paged, None, compiled), sampling_rows, []

        ids, paged = self._paged_batch(batch, 0)
        ends = [e - 1 for e in itertools.accumulate(batch.num_new_tokens)]
        rows = [ends[r] for r in sampling_rows]
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
        # Dynamic shapes specialise sizes 0 and 1: one token, or one or no logit row, would compile a graph
        # of its own.
        compiled = self.compiled_prefill is not None and len(ids) > 1
        while compiled and len(rows) < 2:  # extra logit rows are dropped with the others past the sampled ones
            rows.append(rows[-1] if rows else 0)
        return StepPlan(ids, paged, torch.tensor(rows, dtype=torch.long, device=self.device), compiled), \
            sampling_rows, jobs

    # -- execution (every rank) ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        meta = self.backend.prepare(plan.batch)
        if plan.logit_rows is None:
            forward = self.compiled if plan.compiled else self._logits_at_every_token
            return forward(plan.input_ids, plan.batch.positions, meta)
        if plan.compiled:
            with opaque_attention_step(self.backend, meta):
                return self.compiled_prefill(plan.input_ids, plan.batch.positions, plan.logit_rows)
        return self._logits_at_rows(plan.input_ids, plan.batch.positions, plan.logit_rows, meta)

    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], dict[int, list[TokenLogprob]]]:
        """Logits of the rows that sample this step, which rows those are, and prompt logprobs by row."""
        plan, sampling_rows, jobs = self.plan(batch)
        if self.tp.size > 1:
            dist.broadcast_object_list([plan], src=0)
        logits = self.execute(plan)
        if plan.logit_rows is None:
            return logits[:len(batch.seqs)], sampling_rows, {}
        prompt_logprobs = {}
        for job in jobs:
            n = job.last - job.first
            seq = batch.seqs[job.row]
            targets = torch.tensor(seq.prompt_token_ids[job.first + 1:job.last + 1], device=logits.device)
            lp = logits[job.offset:job.offset + n].log_softmax(dim=-1)
            prompt_logprobs[job.row] = top_logprobs(lp, targets, seq.params.prompt_logprobs)
        return logits[:len(sampling_rows)], sampling_rows, prompt_logprobs

    def serve_rank(self) -> None:
        """Loop of a rank > 0: execute whatever rank 0 broadcasts until it sends None."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            self.execute(box[0])


def compile_options(compile_cfg: Any, device: torch.device) -> dict[str, Any]:
    """torch.compile's `mode` or `options` for the configured mode on this device."""
    if compile_cfg.mode != "auto":
        return {"mode": compile_cfg.mode}
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    options = dict(compile_cfg.cpu)
    # Inductor reads `freezing` before it applies per-call options, so it only works set globally.
    torch._inductor.config.freezing = bool(options.pop("freezing", False))
    return {"options": options}


def kv_heads_per_rank(mc: ModelConfig, tp: TPGroup) -> int:
    return shard_heads(mc.num_heads, mc.num_kv_heads, tp.size, tp.rank).kv_heads


def build_runner(cfg: DictConfig, source: ModelSource, mc: ModelConfig, num_pages: int, dtype: torch.dtype,
                 device: torch.device, tp: TPGroup) -> tuple[ModelRunner, KVPool]:
    """This rank's KV pool, attention backend, model shard and runner (identical code on every rank)."""
    page_size = int(cfg.kv_cache.page_size)
    pool = KVPool(mc.num_layers, kv_heads_per_rank(mc, tp), mc.head_dim, num_pages, page_size, dtype, device)
    backend = hydra.utils.instantiate(cfg.attention)(k_cache=pool.k, v_cache=pool.v, page_size=page_size)
    model = build_model(source, mc, backend, dtype, device, tp)
    return ModelRunner(model, backend, page_size, device, cfg.compile, int(cfg.scheduler.max_num_batched_tokens)), pool
