"""Draft-model proposals (`spec=draft`): a smaller model that shares the target's tokenizer proposes its own
greedy continuation, k tokens one step at a time, for every speculating sequence at once.

The draft keeps its own paged KV (a pool of `spec.memory_mb`, no prefix sharing) and, per sequence, a shadow
`Sequence` holding what it has computed. Before proposing it catches up on the tokens the target added since
(the prompt the first time; afterwards the accepted draft and the target's own token): its K/V for a rejected
guess is simply overwritten, as positions past the common prefix are recomputed.

A greedy draft proposes each token with certainty, so the engine's verification (draw from the target's
distribution, keep the draft token while the draw equals it) is exactly speculative sampling's rule for it:
output is distributed as the target's at any temperature. A sampled draft with the min(1, p/q) rule would accept
more at high temperature; at temperature 0 the two are the same.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.kv_cache import pages_for_budget
from engine.kv_manager import KVManager
from engine.prefix_cache import NoPrefixCache
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.spec.base import Proposer

log = logging.getLogger(__name__)


class DraftProposer(Proposer):
    def __init__(
        self, model: dict[str, Any] | None = None, memory_mb: float = 64, num_tokens: int = 3, **kwargs
    ) -> None:
        super().__init__(num_tokens, **kwargs)  # the values were checked with the config (engine/config.py)
        self.path = (model or {}).get("path")
        self.memory_mb = memory_mb
        self.runner = self.kv = None
        self.vocab_size = 0

    def describe(self) -> str:
        return f"draft model {self.path}, {super().describe()}"

    def attach(self, cfg: Any, target_vocab_size: int) -> None:
        """Load the draft model beside the target: the same attention, compile and quant choices, its own pool."""
        from engine.config import KVCacheConfig, ModelSettings
        from engine.model_runner import build_runner, kv_heads_per_rank
        from engine.models.loader import load_config
        from engine.models.source import resolve_model
        from engine.parallel import TPGroup

        source = resolve_model(self.path)
        mc = load_config(source)
        draft_cfg = cfg.replace(
            model=ModelSettings(path=str(source.path), max_model_len=cfg.model.max_model_len),
            kv_cache=KVCacheConfig(page_size=cfg.kv_cache.page_size, memory_mb=self.memory_mb),
        )
        tp = TPGroup(0, 1)
        page_size = cfg.kv_cache.page_size
        num_pages = pages_for_budget(
            mc.num_layers, kv_heads_per_rank(mc, tp), mc.head_dim, page_size, self.memory_mb, cfg.torch_dtype
        )
        if num_pages < 2:
            raise ValueError(f"invalid spec.memory_mb={self.memory_mb}: holds no page of the draft model")
        self.runner, pool = build_runner(draft_cfg, source, mc, num_pages, tp)
        allocator, window_allocator = pool.allocators()
        window = max(mc.windows()) if window_allocator is not None else 0
        cache = NoPrefixCache(allocator, page_size, window_allocator)
        self.kv = KVManager(allocator, cache, page_size, window_allocator, window)
        self.budget = cfg.scheduler.max_num_batched_tokens
        self.vocab_size = min(mc.vocab_size, target_vocab_size)  # a proposal must be a token of both
        log.info("draft model: %s (%d layers, %d KV pages)", source.path.name, mc.num_layers, num_pages)

    # -- per-sequence state ---------------------------------------------------------------------------

    def _shadow(self, seq: Sequence) -> Sequence:
        """The draft's view of `seq`: its tokens so far and the K/V the draft computed for them."""
        state = self.state(seq)
        if state.extra is None:
            state.extra = Sequence(seq.seq_id, list(seq.token_ids), SamplingParams(), seq.arrival)
        shadow = state.extra
        # The draft's K/V holds the tokens it computed; keep those the sequence still has (a rejected guess's
        # are recomputed), and always the last token, whose logits start the proposal.
        same = 0
        limit = min(shadow.num_computed_tokens, seq.num_tokens - 1)
        while same < limit and shadow.token_ids[same] == seq.token_ids[same]:
            same += 1
        shadow.token_ids = list(seq.token_ids)
        shadow.num_computed_tokens = same
        if shadow.pages:
            self.kv.trim(shadow)
        return shadow

    def forget(self, seq: Sequence) -> None:
        if seq.spec is not None and seq.spec.extra is not None:
            self.kv.release(seq.spec.extra)
            seq.spec.extra = None

    # -- proposing ------------------------------------------------------------------------------------

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        lengths = [min(n, self.length(s)) if n > 0 else 0 for s, n in zip(seqs, limits)]
        drafts: list[list[int]] = [[] for _ in seqs]
        shadows = {i: self._shadow(s) for i, s in enumerate(seqs) if lengths[i] > 0}
        self._catch_up(shadows, drafts)
        for depth in range(1, max(lengths, default=0)):
            going = {i: d for i, d in shadows.items() if len(drafts[i]) == depth < lengths[i]}
            for i, shadow in going.items():
                shadow.token_ids.append(drafts[i][-1])
            self._step(going, drafts)
        return drafts

    def _catch_up(self, shadows: dict[int, Sequence], drafts: list[list[int]]) -> None:
        """Compute each shadow's missing tokens (in steps of at most the token budget); a shadow whose last
        token is computed proposes its first token."""
        pending = dict(shadows)
        while pending:
            budget, batch = self.budget, {}
            for i, shadow in pending.items():
                if budget > 0:
                    batch[i] = min(shadow.num_tokens - shadow.num_computed_tokens, budget)
                    budget -= batch[i]
            self._step({i: pending[i] for i in batch}, drafts, batch)
            # Done: caught up, or dropped by `_step` for lack of room (no tokens left).
            pending = {i: s for i, s in pending.items() if s.num_computed_tokens < s.num_tokens}

    def _step(
        self, shadows: dict[int, Sequence], drafts: list[list[int]], counts: dict[int, int] | None = None
    ) -> None:
        """One draft step over `shadows` (`counts` new tokens each, else one); those that reach their last token
        get their next greedy token appended to their draft. A shadow the draft pool has no room for stops
        proposing (its draft so far stands)."""
        rows, news = [], []
        for i, shadow in shadows.items():
            n = 1 if counts is None else counts[i]
            if not self.kv.ensure_capacity(shadow, shadow.num_computed_tokens + n, evict=False):
                self.kv.release(shadow)
                shadow.token_ids = []
                continue
            rows.append(i)
            news.append(n)
        if not rows:
            return
        batch = ScheduledBatch([shadows[i] for i in rows], news)
        logits, sampling_rows, _ = self.runner.run(batch)
        for shadow, n in zip(batch.seqs, news):
            shadow.num_computed_tokens += n
        tokens = logits[:, : self.vocab_size].argmax(dim=-1).tolist()
        for r, token in zip(sampling_rows, tokens):
            drafts[rows[r]].append(token)

    def pool_is_free(self) -> bool:
        """Every draft page is back (no sequence holds a shadow)."""
        return self.kv.allocator.num_free == self.kv.allocator.capacity
