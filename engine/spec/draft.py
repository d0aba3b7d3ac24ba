"""Draft-model proposals (`spec=draft`): a smaller model that shares the target's tokenizer proposes its own
continuation, k tokens one step at a time, for every speculating sequence at once.

The draft keeps its own paged KV (a pool of `spec.memory_mb`, no prefix sharing) and, per sequence, a shadow
`Sequence` holding what it has computed. Before proposing it catches up on the tokens the target added since
(the prompt the first time; afterwards the accepted draft and the target's own token): its K/V for a rejected
guess is simply overwritten, as positions past the common prefix are recomputed.

A greedy request gets the draft's greedy tokens. A sampled one (temperature > 0) gets tokens the draft samples
at the request's temperature, top-k, top-p and min-p, each with the distribution q it was drawn from, which the
verification keeps with probability min(1, p/q) (engine/sampler.py): speculative sampling, whose acceptance is
1 - TV(p, q) where a greedy draft's is only p(argmax q) — at temperature 1 with the target as its own draft,
every token against 41% (tests/test_spec_decode.py). `spec.sample_drafts=false` proposes
greedily at every temperature, so a seeded request's tokens equal those without speculation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine.kv_cache import pages_for_budget
from engine.kv_manager import KVManager
from engine.prefix_cache import NoPrefixCache
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.spec.base import Proposer

log = logging.getLogger(__name__)


class DraftProposer(Proposer):
    def __init__(
        self,
        model: dict[str, Any] | None = None,
        memory_mb: float = 64,
        num_tokens: int = 3,
        sample_drafts: bool = True,
        quant: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_tokens, **kwargs)  # the values were checked with the config (engine/config.py)
        self.path = (model or {}).get("path")
        self.memory_mb = memory_mb
        self.sample_drafts = sample_drafts
        self.quant = quant  # a configs/quant choice for the draft; None: the target's
        self.sampler = Sampler()
        self.runner = self.kv = None
        self.vocab_size = 0

    def describe(self) -> str:
        drafts = "sampled at the request's temperature" if self.sample_drafts else "greedy"
        quant = f", quant={self.quant}" if self.quant else ""
        return f"draft model {self.path} ({drafts}{quant}), {super().describe()}"

    def attach(self, cfg: Any, target_vocab_size: int) -> None:
        """Load the draft model beside the target: the same attention and compile choices, the target's quant
        unless `spec.quant` names one, its own pool."""
        from engine.config import KVCacheConfig, ModelSettings, quant_choice
        from engine.model_runner import build_runner, kv_heads_per_rank
        from engine.models.loader import load_config
        from engine.models.source import resolve_model
        from engine.parallel import TPGroup

        source = resolve_model(self.path)
        mc = load_config(source)
        # Vocabularies padded differently (one family's sizes) are fine; a different tokenizer is not.
        if abs(mc.vocab_size - target_vocab_size) > 0.01 * target_vocab_size:
            raise ValueError(
                f"invalid spec.model.path={self.path}: its vocabulary has {mc.vocab_size} tokens, the target's "
                f"{target_vocab_size}; a draft model must share the target's tokenizer"
            )
        draft_cfg = cfg.replace(
            model=ModelSettings(path=str(source.path), max_model_len=cfg.model.max_model_len),
            kv_cache=KVCacheConfig(page_size=cfg.kv_cache.page_size, memory_mb=self.memory_mb),
            quant=cfg.quant if self.quant is None else quant_choice(self.quant),
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
        self.sampler = Sampler(cfg.seed)
        self.vocab_size = min(mc.vocab_size, target_vocab_size)  # a proposal must be a token of both
        self.embedded_tokens = mc.vocab_size
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

    def _embeddable(self, shadow: Sequence) -> bool:
        """Whether the draft can embed the tokens it has yet to compute: a token of the target's vocabulary
        padding (one family's sizes differ) gets no draft rather than an out-of-range lookup."""
        return max(shadow.token_ids[shadow.num_computed_tokens :], default=0) < self.embedded_tokens

    def forget(self, seq: Sequence) -> None:
        if seq.spec is not None and seq.spec.extra is not None:
            self.kv.release(seq.spec.extra)
            seq.spec.extra = None

    # -- proposing ------------------------------------------------------------------------------------

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Also leaves each sampled draft's distributions in `seq.draft_probs`."""
        lengths = [min(n, self.length(s)) if n > 0 else 0 for s, n in zip(seqs, limits)]
        drafts: list[list[int]] = [[] for _ in seqs]
        self._owners = seqs
        shadows = {i: self._shadow(s) for i, s in enumerate(seqs) if lengths[i] > 0}
        shadows = {i: shadow for i, shadow in shadows.items() if self._embeddable(shadow)}
        self._catch_up(shadows, drafts)
        for depth in range(1, max(lengths, default=0)):
            going = {i: d for i, d in shadows.items() if len(drafts[i]) == depth < lengths[i]}
            for i, shadow in going.items():
                shadow.token_ids.append(drafts[i][-1])
            self._step(going, drafts)
        return drafts

    def _catch_up(self, shadows: dict[int, Sequence], drafts: list[list[int]]) -> None:
        """Compute each shadow's missing tokens; a shadow whose last token is computed proposes its first token.
        After a verification a shadow misses a few tokens (the last drafted one and the target's own), computed
        as decode rows (`ModelRunner.run_as_token_rows`); a prompt, or what a paused sequence added, goes
        through prefill steps of at most the token budget."""
        few = {i: s for i, s in shadows.items() if 0 < s.num_tokens - s.num_computed_tokens <= 1 + self.num_tokens}
        if few:
            self._step(few, drafts, {i: s.num_tokens - s.num_computed_tokens for i, s in few.items()}, as_rows=True)
        pending = {i: s for i, s in shadows.items() if i not in few}
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
        self,
        shadows: dict[int, Sequence],
        drafts: list[list[int]],
        counts: dict[int, int] | None = None,
        as_rows: bool = False,
    ) -> None:
        """One draft step over `shadows` (`counts` new tokens each, else one; `as_rows`: a decode row per token,
        every shadow's last one reached); those that reach their last token get their next token appended to
        their draft (`_choose`). A shadow the draft pool has no room for stops proposing (its draft so far
        stands)."""
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
        if as_rows:
            logits, sampling_rows = self.runner.run_as_token_rows(batch), list(range(len(rows)))
        else:
            logits, sampling_rows, _ = self.runner.run(batch)
        for shadow, n in zip(batch.seqs, news):
            shadow.num_computed_tokens += n
        self._choose(logits[:, : self.vocab_size], [rows[r] for r in sampling_rows], drafts)

    def _choose(self, logits: torch.Tensor, owners: list[int], drafts: list[list[int]]) -> None:
        """Each row's next draft token: the argmax for a greedy request, else a draw from the draft's
        distribution at the request's sampling settings, which is kept beside it for the verification."""
        seqs = [self._owners[i] for i in owners]
        tokens = logits.argmax(dim=-1)
        sampled = [r for r, s in enumerate(seqs) if self.sample_drafts and not s.params.greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            probs = self.sampler.distribution(logits[index], [seqs[r] for r in sampled])
            tokens = tokens.index_copy(0, index, self.sampler.draw(probs, [seqs[r] for r in sampled]))
            for r, q in zip(sampled, probs):
                seqs[r].draft_probs.append(q)
        for i, token in zip(owners, tokens.tolist()):
            drafts[i].append(token)

    def pool_is_free(self) -> bool:
        """Every draft page is back (no sequence holds a shadow)."""
        return self.kv.allocator.num_free == self.kv.allocator.capacity
