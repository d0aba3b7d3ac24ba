"""The engine core: model + paged KV + scheduler + sampler, driven one step at a time.

It speaks token ids only. Text (tokenizer, detokenizer, stop strings) belongs to the frontend, which
may live in another process; that is why `step` returns small `StepOutput` records.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, open_dict

from engine.kv_cache import PageAllocator, pages_for_budget
from engine.kv_manager import KVManager
from engine.model_runner import build_runner, kv_heads_per_rank
from engine.models.loader import load_config
from engine.models.source import ModelSource
from engine.parallel import TPGroup, check_divisible, init_distributed
from engine.tp_worker import ranks_of_node, start_local_ranks
from engine.outputs import StepOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams, check_request
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(value: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes in it (GPUs, CPUs with AVX-512 BF16 / AMX) and
    float32 elsewhere: emulated bf16 GEMMs measured slower than fp32 from batch 4 on an AVX2 CPU, and
    bf16 prefill 4x slower."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"invalid dtype={value!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


class LLMEngine:
    def __init__(self, cfg: DictConfig, source: ModelSource, extra_eos: list[int] = ()) -> None:
        self.cfg = cfg
        self.dtype = parse_dtype(cfg.dtype, cfg.device)
        self.device = torch.device(cfg.device)
        self.model_config = mc = load_config(source)
        self.eos_token_ids = set(mc.eos_token_ids) | set(extra_eos)

        page_size = int(cfg.kv_cache.page_size)
        if page_size < 1:
            raise ValueError(f"invalid kv_cache.page_size={page_size}: must be >= 1")
        self.tp = TPGroup(0, int(cfg.parallel.tp))
        if self.tp.size < 1:
            raise ValueError(f"invalid parallel.tp={self.tp.size}: must be >= 1")
        check_divisible(mc.intermediate_size, self.tp.size)
        kv_heads = kv_heads_per_rank(mc, self.tp)  # raises early when tp does not fit the heads
        num_pages = cfg.kv_cache.num_pages
        if not num_pages:
            # The budget, but no more than every running slot filled to the full context could use.
            context = int(cfg.model.max_model_len or mc.max_position_embeddings)
            most = -(-cfg.scheduler.max_running_requests * context // page_size) + 1
            budget = pages_for_budget(mc.num_layers, kv_heads, mc.head_dim, page_size, cfg.kv_cache.memory_mb,
                                      self.dtype)
            num_pages = min(budget, most)
        self.workers = self._start_tp(cfg, int(num_pages)) if self.tp.size > 1 else []
        self.runner, self.pool = build_runner(cfg, source, mc, int(num_pages), self.dtype, self.device, self.tp)
        self.model = self.runner.model
        self.allocator = PageAllocator(self.pool.num_pages)
        self.prefix_cache = hydra.utils.instantiate(cfg.cache)(allocator=self.allocator, page_size=page_size)
        self.kv = KVManager(self.allocator, self.prefix_cache, page_size)
        self.scheduler: Scheduler = hydra.utils.instantiate(cfg.scheduler)(kv=self.kv)
        self.sampler = Sampler(cfg.seed)
        # The longest sequence must fit the pool on its own, so a lone request can always finish.
        self.max_model_len = min(int(cfg.model.max_model_len or mc.max_position_embeddings),
                                 mc.max_position_embeddings, self.allocator.capacity * page_size)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    def _start_tp(self, cfg: DictConfig, num_pages: int) -> list:
        """Start this node's other ranks and join the process group as rank 0."""
        p = cfg.parallel
        if p.master_port is None:
            with socket.socket() as sock:
                sock.bind((p.master_addr, 0))
                port = sock.getsockname()[1]
            with open_dict(cfg):
                cfg.parallel.master_port = port
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.tp.size))
        log.info("tensor parallel: %d ranks, rendezvous %s:%s, kv_cache.num_pages=%d", self.tp.size,
                 p.master_addr, cfg.parallel.master_port, num_pages)
        workers = start_local_ranks(cfg, ranks_of_node(cfg, 0)[1:], num_pages)
        init_distributed(0, self.tp.size, p.master_addr, int(cfg.parallel.master_port), p.backend,
                         float(p.timeout_s))
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

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise ValueError(f"duplicate request_id={request_id!r}")
        check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals))
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)  # the first token has nothing before it
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request wherever it is; its pages go back at once. Unknown or finished ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        if self.workers:
            self.check_health()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        logits, rows, prompt_logprobs = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for row, entries in prompt_logprobs.items():
            batch.seqs[row].prompt_logprobs.extend(entries)

        outputs: list[StepOutput] = []
        if rows:
            sampled = [batch.seqs[r] for r in rows]
            tokens, logprobs = self.sampler(logits, sampled)
            for seq, token, lp in zip(sampled, tokens, logprobs):
                outputs.append(self._append(seq, token, lp))
        if not batch.is_decode_only:
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                if seq.status is Status.RUNNING and n > 1:
                    self.kv.cache_computed(seq)  # share finished prefill pages with later arrivals now
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: Any) -> StepOutput:
        first = seq.num_output_tokens == 0
        seq.token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.seqs[seq.request_id]
        return StepOutput(
            request_id=seq.request_id, new_token_ids=[token], new_logprobs=[logprob] if logprob else [],
            finished=reason is not None, finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            prompt_logprobs=seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- introspection -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_pages_total": self.allocator.capacity,
            "kv_pages_free": self.allocator.num_free,
            "kv_pages_cached": self.prefix_cache.total_pages,
            "kv_pages_evictable": self.prefix_cache.evictable_pages,
            "preemptions": self.scheduler.num_preemptions,
            "decode_compiled": int(self.runner.compiled is not None),
            "prefill_compiled": int(self.runner.compiled_prefill is not None),
        }
