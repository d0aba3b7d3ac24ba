"""Continuous batching with chunked prefill, prefix-aware admission and preemption by recompute.

Every step is one token budget shared by all sequences: running ones first (a decode costs one token,
an unfinished prefill continues with a chunk), then waiting ones are admitted in policy order while
the budget, the running limit and free KV pages allow. A sequence that cannot get a page for its next
token preempts the newest running sequence, whose pages go back (cached where reusable) and which
later recomputes its prompt and output so far.

Batch-invariant (config `batch_invariant`, kernels/row_invariant.py): a step holds decode rows or prompt rows,
never both (they take turns when both wait), and a prompt is cut into chunks at fixed positions (multiples of
the token budget), each scheduled whole: a prompt row then sees the same chunk, and so the same attention
call, alone or in any batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.kv_manager import KVManager
from engine.policies.base import AdmissionPolicy
from engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    @property
    def is_decoding(self) -> bool:
        """Every row decodes: its one known token, and perhaps a draft after it (no prompt tokens)."""
        return all(
            n == 1 + len(s.draft_token_ids) and s.num_computed_tokens + 1 == s.num_tokens
            for s, n in zip(self.seqs, self.num_new_tokens)
        )

    @property
    def sampling_rows(self) -> list[int]:
        """Rows whose last scheduled token ends their known tokens (or their draft): they sample this step."""
        return [
            i
            for i, (s, n) in enumerate(zip(self.seqs, self.num_new_tokens))
            if s.num_computed_tokens + n == s.num_tokens + len(s.draft_token_ids)
        ]


class Scheduler:
    """Limits come validated from `SchedulerConfig`; the policy orders admission (engine/policies/)."""

    def __init__(
        self,
        kv: KVManager,
        policy: AdmissionPolicy,
        max_running_requests: int,
        max_num_batched_tokens: int,
        batch_invariant: bool = False,
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.max_running = max_running_requests
        self.token_budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.batch_invariant = batch_invariant
        self._prompt_turn = False  # batch-invariant: whether prompt rows go next when decode rows wait too

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is (running or waiting) and return its KV pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.release(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _fit_draft(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's draft tokens (speculative decoding) this step scores: as many as the
        token budget and free KV pages allow, since a guess never preempts a sequence nor evicts the prefix
        cache; the rest of the draft is dropped."""
        draft = seq.draft_token_ids[: max(0, budget)]
        if draft and not self.kv.ensure_capacity(seq, seq.num_tokens + len(draft), evict=False):
            draft = []
        seq.draft_token_ids = draft
        return len(draft)

    def _preempt(self, seq: Sequence) -> None:
        seq.draft_token_ids = []
        self.running.remove(seq)
        self.kv.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's uncomputed tokens this step computes (0: none fit)."""
        start, remaining = seq.num_computed_tokens, seq.num_tokens - seq.num_computed_tokens
        if not self.batch_invariant:
            return min(remaining, budget)
        end = min(seq.num_tokens, (start // self.token_budget + 1) * self.token_budget)
        return end - start if end - start <= budget else 0

    def _kind(self) -> bool | None:
        """Batch-invariant: True for a step of prompt rows, False for one of decode rows; None otherwise."""
        if not self.batch_invariant:
            return None
        decoding = [s.num_tokens - s.num_computed_tokens == 1 for s in self.running]
        prompts = bool(self.waiting) or not all(decoding)
        self._prompt_turn = prompts and (not any(decoding) or not self._prompt_turn)
        return self._prompt_turn

    def schedule(self) -> ScheduledBatch:
        prompts = self._kind()
        batch, preempted = self._schedule(prompts)
        if prompts and not batch.seqs and not preempted:  # no prompt fits: the decode rows go meanwhile
            self._prompt_turn = False
            batch, _ = self._schedule(False)
        return batch

    def _schedule(self, prompts: bool | None) -> tuple[ScheduledBatch, bool]:
        """The step's rows: only prompt rows (`prompts` True), only decode rows (False), or any (None); and
        whether a sequence was preempted for them."""
        budget = self.token_budget
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        # Oldest first, so the newest (the preemption victim) has never been scheduled in this step.
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.awaiting_last_token:  # preempted in this loop; or done
                continue
            if prompts is not None and prompts == (seq.num_tokens - seq.num_computed_tokens == 1):
                continue  # the other kind of row
            n = self._chunk(seq, budget)
            if n == 0:
                continue
            while not self.kv.ensure_capacity(seq, seq.num_computed_tokens + n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            n += self._fit_draft(seq, budget - n)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        # Admitting while others were just preempted for lack of pages would only thrash.
        if not preempted and prompts is not False:
            self.waiting = deque(self.policy.order(list(self.waiting), self.kv))
            while self.waiting and budget > 0 and len(self.running) < self.max_running:
                seq = self.waiting[0]
                if self._chunk(seq, budget) == 0 or not self.kv.admit(seq, budget):
                    break
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)
                n = self._chunk(seq, budget)
                seqs.append(seq)
                counts.append(n)
                budget -= n
        return ScheduledBatch(seqs, counts), preempted
