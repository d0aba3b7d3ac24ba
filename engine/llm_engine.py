"""The engine core: model + paged KV + scheduler + sampler, driven one step at a time.

It speaks token ids only. Text (tokenizer, detokenizer, stop strings) belongs to the frontend, which
may live in another process; that is why `step` returns small `StepOutput` records.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import time
from typing import Any

import torch

from engine import step_graphs
from engine.config import EngineConfig
from engine.kv_cache import pages_for_budget
from engine.kv_manager import KVManager
from engine.model_runner import build_runner, kv_heads_per_rank, max_model_len
from engine.models.loader import load_config
from engine.models.source import ModelSource
from engine.outputs import StepOutput
from engine.overlap import InFlight
from engine.parallel import TPGroup, check_divisible, init_distributed
from engine.prefix_cache import PrefixCache
from engine.progress import slow_step
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams, check_request
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, Status
from engine.spec.base import Proposer
from engine.spec.governor import Governor
from engine.structured import GrammarBackend
from engine.tp_worker import start_local_ranks

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, source: ModelSource, extra_eos: list[int] = ()) -> None:
        self.cfg = cfg
        self.dtype = cfg.torch_dtype
        self.device = torch.device(cfg.device)
        self.model_config = mc = load_config(source)
        self.eos_token_ids = set(mc.eos_token_ids) | set(extra_eos)

        page_size = cfg.kv_cache.page_size
        self.tp = TPGroup(0, cfg.parallel.tp)
        check_divisible(mc.intermediate_size, self.tp.size)
        kv_heads = kv_heads_per_rank(mc, self.tp)  # raises early when tp does not fit the heads
        num_pages = cfg.kv_cache.num_pages or self._pages_for_budget(kv_heads)
        self.workers = self._start_tp(num_pages) if self.tp.size > 1 else []
        self.runner, self.pool = build_runner(self.cfg, source, mc, num_pages, self.tp)
        self.model = self.runner.model
        self.allocator, self.window_allocator = self.pool.allocators()
        self.prefix_cache: PrefixCache = cfg.cache.build(
            allocator=self.allocator, page_size=page_size, window_allocator=self.window_allocator
        )
        window = max(mc.windows()) if self.window_allocator is not None else 0
        # Batch-invariant, prompts are computed in chunks of the token budget (engine/scheduler.py).
        chunk = cfg.scheduler.max_num_batched_tokens if cfg.batch_invariant else 0
        self.kv = KVManager(self.allocator, self.prefix_cache, page_size, self.window_allocator, window, chunk)
        if window:
            log.info(
                "KV pages: the %d sliding-window layers keep their last %d tokens, the other %d the whole context",
                len(self.pool.window_layers),
                window,
                mc.num_layers - len(self.pool.window_layers),
            )
        s = cfg.scheduler
        self.scheduler = Scheduler(
            self.kv, s.policy.build(), s.max_running_requests, s.max_num_batched_tokens, cfg.batch_invariant
        )
        self.sampler = Sampler(cfg.seed)
        self.proposer: Proposer = cfg.spec.build()
        self.proposer.attach(cfg, mc.vocab_size)
        self.governor = Governor() if self.proposer.enabled and self.proposer.only_when_faster else None
        if self.proposer.enabled:
            log.info("speculative decoding: %s", self.proposer.describe())
        self.spec_stats = {"spec_steps": 0, "spec_proposed_tokens": 0, "spec_accepted_tokens": 0}
        self.max_model_len = max_model_len(cfg, mc, self.pool)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.grammars = GrammarBackend(source, mc.vocab_size)
        self.awaiting_grammar: list[Sequence] = []  # constrained sequences waiting for `grammars` to be ready
        self.in_flight: InFlight | None = None  # overlap scheduling's step launched but not read (engine/overlap.py)

    def _pages_for_budget(self, kv_heads: int) -> int:
        """`kv_cache.memory_mb` in pages, but no more than every running slot filled to the full context
        could use."""
        mc, cfg = self.model_config, self.cfg
        context = cfg.model.max_model_len or mc.max_position_embeddings
        most = -(-cfg.scheduler.max_running_requests * context // cfg.kv_cache.page_size) + 1
        budget = pages_for_budget(
            mc.num_layers, kv_heads, mc.head_dim, cfg.kv_cache.page_size, cfg.kv_cache.memory_mb, self.dtype
        )
        return min(budget, most)

    def _start_tp(self, num_pages: int) -> list:
        """Start this node's other ranks and join the process group as rank 0."""
        p = self.cfg.parallel
        if p.master_port is None:
            with socket.socket() as sock:
                sock.bind((p.master_addr, 0))
                p = dataclasses.replace(p, master_port=sock.getsockname()[1])
            self.cfg = self.cfg.replace(parallel=p)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.tp.size))
        log.info(
            "tensor parallel: %d ranks, rendezvous %s:%s, kv_cache.num_pages=%d",
            self.tp.size,
            p.master_addr,
            p.master_port,
            num_pages,
        )
        workers = start_local_ranks(self.cfg, p.ranks_of_node(0)[1:], num_pages)
        init_distributed(0, self.tp.size, p.master_addr, p.master_port, p.backend, p.timeout_s)
        return workers

    def check_health(self) -> None:
        """Raise if a tensor-parallel rank has died (a step would fail or hang on it)."""
        dead = [w.name for w in self.workers if not w.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel rank(s) died: {', '.join(dead)}")

    def shutdown(self) -> None:
        if self.workers and torch.distributed.is_initialized():
            if all(w.is_alive() for w in self.workers):
                torch.distributed.broadcast_object_list([None], src=0)
            torch.distributed.destroy_process_group()
            for w in self.workers:
                w.join(timeout=10)
                if w.is_alive():
                    w.kill()
        self.workers = []

    # -- requests ------------------------------------------------------------------------------------

    def add_sequence(self, seq_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"duplicate seq_id={seq_id!r}")
        check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        seq = Sequence(seq_id, list(prompt_token_ids), params, next(self._arrivals))
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)  # the first token has nothing before it
        self.seqs[seq_id] = seq
        if params.constrained:
            self.grammars.start()  # a no-op once started; its sequences wait in `awaiting_grammar` till ready
            self.awaiting_grammar.append(seq)
        else:
            self.scheduler.add(seq)

    def abort_sequence(self, seq_id: str, reason: str = "abort") -> None:
        """Stop a request wherever it is; its pages go back at once. Unknown or finished ids are ignored."""
        seq = self.seqs.pop(seq_id, None)
        if seq in self.awaiting_grammar:
            self.awaiting_grammar.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, reason
        elif seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, reason)
            self.proposer.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.awaiting_grammar) or self.in_flight is not None

    def _admit_constrained(self) -> list[StepOutput]:
        """Give the sequences that waited for the grammar tokenizer their matchers and hand them to the
        scheduler (or fail them if it could not be built)."""
        if not self.awaiting_grammar or not self.grammars.ready.is_set():
            return []
        failed = []
        for seq in self.awaiting_grammar:
            try:
                if self.grammars.failed:
                    raise ValueError(self.grammars.failed)
                seq.matcher = self.grammars.matcher(seq.params)
                self.scheduler.add(seq)
            except ValueError as e:
                del self.seqs[seq.seq_id]
                seq.status, seq.finish_reason = Status.FINISHED, "error"
                failed.append(StepOutput(seq.seq_id, [], finished=True, finish_reason="error", error=str(e)))
        self.awaiting_grammar.clear()
        return failed

    # -- stepping ------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        if self.workers:
            self.check_health()
        outputs = self._admit_constrained()
        if not self.cfg.overlap or self._needs_latest_tokens():
            return outputs + self._land() + self._step_in_place()
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.seqs else None
        outputs += self._land()
        self.in_flight = launched
        return outputs

    def _needs_latest_tokens(self) -> bool:
        """Whether a sequence that may run next samples from what the host knows of its latest tokens (a grammar's
        mask, penalties) or gathers prompt logprobs: an overlapped step does neither (engine/overlap.py)."""
        return any(
            s.matcher is not None or s.params.penalised or s.wants_prompt_logprobs
            for s in itertools.chain(self.scheduler.running, self.scheduler.waiting)
        )

    def _launch(self, batch: ScheduledBatch) -> InFlight:
        """Prepare and launch the step, its sampling included, without reading anything it computes."""
        previous = self.in_flight.result.tokens if self.in_flight is not None else None
        with slow_step(log, f"a step of {sum(batch.num_new_tokens)} tokens is still running"):
            logits, rows, _ = self.runner.run(batch, previous)
            sampled = [batch.seqs[r] for r in rows]
            launched = InFlight.hold(sampled, self.sampler.sample(logits, sampled))
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if n > 1:
                self.kv.cache_computed(seq)  # the device writes these pages before any later step reads them
        for seq in sampled:
            p = seq.params
            seq.awaiting_last_token = seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len
        return launched

    def _land(self) -> list[StepOutput]:
        """Read the tokens of the step in flight (if any) and do for the sequences still going what `_append` does
        for a step run in place."""
        launched, self.in_flight = self.in_flight, None
        if launched is None:
            return []
        tokens, logprobs = launched.result.read()
        outputs = []
        for seq, index, token, lp in zip(launched.sampled, launched.placeholders, tokens, logprobs):
            if not seq.is_finished:  # else aborted, or ended by the step before while this one was in flight
                seq.token_ids[index] = token
                outputs.append(self._record(seq, token, lp, index + 1))
        return outputs

    def _step_in_place(self) -> list[StepOutput]:
        """A step run on this thread, its tokens taken in before it returns."""
        outputs = []
        compiled_before, start = step_graphs.compilations(), time.perf_counter()  # drafting is the step's cost too
        if self.proposer.enabled:
            self._propose()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        # A step that compiled a graph (or ran eagerly beside a background warm-up) is no measure of speculation:
        # the first 4-row verification of a lazily compiled engine took 27.6 s and set the governor's rate for
        # speculating at batch 1 to 0.04 tok/s, which kept drafts off for most of the next hundred steps.
        decoding = self.governor is not None and batch.is_decoding and not self.runner.graphs.warming_up
        with slow_step(log, f"a step of {sum(batch.num_new_tokens)} tokens is still running"):
            logits, rows, prompt_logprobs = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            # A draft's K/V counts once its token is accepted (`_verify`).
            seq.num_computed_tokens += n - len(seq.draft_token_ids)
        for row, entries in prompt_logprobs.items():
            batch.seqs[row].prompt_logprobs.extend(entries)

        if rows:
            outputs += self._verify(logits, [batch.seqs[r] for r in rows])
        if decoding and step_graphs.compilations() == compiled_before:
            made = sum(len(out.new_token_ids) for out in outputs)
            speculated = len(batch.seqs) < sum(batch.num_new_tokens)
            self.governor.record(speculated, len(batch.seqs), made, time.perf_counter() - start)
        if not batch.is_decode_only:
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                if seq.status is Status.RUNNING and n > 1:
                    self.kv.cache_computed(seq)  # share finished prefill pages with later arrivals now
        return outputs

    def _propose(self) -> None:
        """Drafts for the running sequences that decode next, before scheduling: the scheduler gives them
        their place in the step before it admits new prompts (vLLM's order). Each is no longer than what the
        sequence may still generate, and cut where a constrained sequence's grammar refuses a token."""
        seqs = []
        for seq in self.scheduler.running:
            seq.draft_token_ids, seq.draft_probs = [], []
            if seq.num_computed_tokens + 1 == seq.num_tokens:
                seqs.append(seq)
        if self.governor is not None and not self.governor.allow(len(seqs)):
            return
        # The target's own token after the draft is always generated, so a draft may be one shorter than what
        # the sequence has left.
        limits = [min(s.params.max_tokens - s.num_output_tokens, self.max_model_len - s.num_tokens) - 1 for s in seqs]
        for seq, draft in zip(seqs, self.proposer.propose(seqs, limits)):
            if draft and seq.matcher is not None:
                draft = draft[: seq.matcher.validate_tokens(draft)]
            seq.draft_token_ids = draft

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[StepOutput]:
        """Sample each sequence's next token; a speculating one then samples again after each draft token its
        sample equals, keeping the longest agreeing run plus the token that ended it.

        Lossless by construction: for a token proposed with certainty (prompt lookup, a greedy draft) the
        speculative-sampling rule (accept with probability p(x), else draw from p without x; Leviathan et
        al. 2023) is exactly "draw from p and accept when the draw is x"; a token a draft model sampled from q
        is kept with probability min(1, p(x)/q(x)) by the sampler, which otherwise draws a different token.
        So each kept token is drawn from the target's distribution given everything before it, with
        penalties, grammar and top-k/top-p/min-p applied as without speculation, and greedy sequences get the
        same tokens as without it.
        """
        firsts = list(itertools.accumulate((1 + len(s.draft_token_ids) for s in seqs), initial=0))
        outputs: dict[int, StepOutput] = {}
        accepted = [0] * len(seqs)
        alive = list(range(len(seqs)))
        for depth in itertools.count():
            rows = [seqs[j] for j in alive]
            index = [firsts[j] + depth for j in alive]
            if index != list(range(logits.shape[0])):  # not the plain step's every row in order
                step_logits = logits[torch.tensor(index, device=logits.device)]
            else:
                step_logits = logits
            drafts = [_sampled_draft(s, depth) for s in rows]
            tokens, logprobs = self.sampler(self._constrain(step_logits, rows), rows, raw=step_logits, drafts=drafts)
            still = []
            for j, seq, token, lp in zip(alive, rows, tokens, logprobs):
                drafted = depth < len(seq.draft_token_ids) and seq.draft_token_ids[depth] == token
                out = self._append(seq, token, lp)
                outputs[j] = outputs[j].extended_by(out) if j in outputs else out
                accepted[j] += drafted
                if drafted and not out.finished:
                    seq.num_computed_tokens += 1  # its K/V, written in this step, holds the accepted token
                    still.append(j)
            alive = still
            if not alive:
                break
        for j, seq in enumerate(seqs):
            if seq.draft_token_ids:
                self._end_draft(seq, accepted[j], outputs[j])
        return [outputs[j] for j in range(len(seqs))]

    def _end_draft(self, seq: Sequence, accepted: int, out: StepOutput) -> None:
        """Account for a verified draft and drop what was rejected: its tokens, and the pages only its K/V
        used (the K/V itself is overwritten by later steps; the prefix cache only takes computed tokens)."""
        proposed = len(seq.draft_token_ids)
        self.proposer.observe(seq, proposed, accepted)
        out.num_draft_proposed, out.num_draft_accepted = proposed, accepted
        self.spec_stats["spec_steps"] += 1
        self.spec_stats["spec_proposed_tokens"] += proposed
        self.spec_stats["spec_accepted_tokens"] += accepted
        seq.draft_token_ids, seq.draft_probs = [], []
        if seq.status is Status.RUNNING:
            self.kv.trim(seq)

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits to sample from: constrained rows masked to what their grammar allows next (in a copy
        when logprobs are reported, so they stay the model's own)."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return logits
        masked = logits.clone() if any(s.params.logprobs for s in seqs) else logits
        self.grammars.mask(masked, rows, [seqs[i].matcher for i in rows])
        return masked

    def _append(self, seq: Sequence, token: int, logprob: Any) -> StepOutput:
        seq.token_ids.append(token)
        return self._record(seq, token, logprob, seq.num_tokens)

    def _record(self, seq: Sequence, token: int, logprob: Any, length: int) -> StepOutput:
        """Account for `token`, the sequence's `length`-th: grammar, logprobs, whether it ends the sequence
        (a placeholder after it, engine/overlap.py, is then dropped)."""
        first = length == seq.num_prompt_tokens + 1
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        reason = self._finish_reason(seq, token, length)
        if reason is not None:
            del seq.token_ids[length:]
            self.scheduler.finish(seq, reason)
            self.proposer.forget(seq)
            del self.seqs[seq.seq_id]
        return StepOutput(
            seq_id=seq.seq_id,
            new_token_ids=[token],
            new_logprobs=[logprob] if logprob else [],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            prompt_logprobs=seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None,
        )

    def _finish_reason(self, seq: Sequence, token: int, length: int) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.matcher is not None and seq.matcher.is_stopped():
            return "stop"  # the constraint is complete (the JSON value closed, the regex matched in full)
        if length - seq.num_prompt_tokens >= p.max_tokens or length >= self.max_model_len:
            return "length"
        return None

    # -- introspection -------------------------------------------------------------------------------

    def _kv_stats(self) -> dict[str, float]:
        """Pool occupancy in pages of every layer. With a windowed group (engine/kv_cache.py) a page of either
        group is the fraction of such a page that its layers are, so the figures stay comparable."""
        cache = self.prefix_cache
        if self.window_allocator is None:
            return {
                "kv_pages_total": self.allocator.capacity,
                "kv_pages_free": self.allocator.num_free,
                "kv_pages_cached": cache.total_pages,
                "kv_pages_evictable": cache.evictable_pages,
            }
        full, windowed = self.allocator.layers, self.window_allocator.layers
        per_page = full + windowed
        return {
            "kv_pages_total": round(self.allocator.capacity * full / per_page, 6),
            "kv_pages_free": round(self.allocator.space.free_layer_pages / per_page, 6),
            "kv_pages_cached": round((cache.total_pages * full + cache.total_window_pages * windowed) / per_page, 6),
            "kv_pages_evictable": round(
                (cache.evictable_pages * full + cache.evictable_window_pages * windowed) / per_page, 6
            ),
        }

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            **self._kv_stats(),
            "preemptions": self.scheduler.num_preemptions,
            "decode_compiled": int(self.runner.graphs.decode is not None),
            "prefill_compiled": int(self.runner.graphs.prefill is not None),
            **self.spec_stats,
        }


def _sampled_draft(seq: Sequence, depth: int) -> tuple[int, torch.Tensor] | None:
    """The draft token at `depth` and the distribution it was sampled from, if it was sampled."""
    if depth < len(seq.draft_token_ids) and depth < len(seq.draft_probs):
        return seq.draft_token_ids[depth], seq.draft_probs[depth]
    return None
