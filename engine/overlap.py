"""Overlap scheduling (config `overlap`; SGLang's and Mini-SGLang's overlap loop): while step N runs, the host
schedules and launches step N+1, then takes in step N's tokens and finishes what they finish.

Step N+1 is scheduled before N's tokens are known. A sequence that samples in N holds a placeholder for that
token (-1 - j: the j-th token N samples) and its rows are frozen as `RowSnapshot`s when scheduled, so the host
can go on changing the sequences. One worker thread runs the steps in launch order, model and sampler, filling
each step's placeholders from the tokens the step before it sampled: on a GPU its only wait is the read of those
tokens, on a CPU its kernels run while the host thread does its Python.

What it costs: a sequence that ends on step N's token (EOS, a stop token, an abort) is computed once more in
N+1, and that token is dropped. One that ends by length is known to end and is not scheduled again
(`Sequence.awaiting_last_token`). Steps whose sampling needs the host's view of a sequence's latest token (a
grammar's mask, penalties over the output so far, prompt logprobs) run without overlap (engine/llm_engine.py).

Every page a step reads or writes stays valid though the host frees pages while it runs: a page freed while
step N runs is handed out again no earlier than when N+1 is scheduled, and written only by N+1 or later, which
the worker runs after N.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine.model_runner import ModelRunner
from engine.outputs import TokenLogprob
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import RowSnapshot, Sequence


@dataclass
class Launched:
    """A step handed to the worker: the sequences it samples for, where each one's placeholder sits in its
    `token_ids`, and the future of (tokens, logprobs)."""

    sampled: list[Sequence]
    placeholders: list[int]
    future: Future = field(repr=False)


class StepWorker:
    """One thread that runs launched steps in order."""

    def __init__(self, runner: ModelRunner, sampler: Sampler) -> None:
        self.runner, self.sampler = runner, sampler
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap-step")
        self._previous: list[int] = []  # tokens sampled by the step run last

    def launch(self, batch: ScheduledBatch) -> Launched:
        """Freeze the batch's rows, hand them to the worker, and put each sampling sequence's placeholder in
        place (the caller then advances `num_computed_tokens` as for a step that has run)."""
        frozen = [RowSnapshot.of(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        rows = ScheduledBatch(frozen, batch.num_new_tokens)
        sampled = [batch.seqs[r] for r in batch.sampling_rows]
        future = self._executor.submit(self._step, rows, sampled)
        placeholders = []
        for j, seq in enumerate(sampled):
            placeholders.append(len(seq.token_ids))
            seq.token_ids.append(-1 - j)
        return Launched(sampled, placeholders, future)

    def _step(self, rows: ScheduledBatch, sampled: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        for row in rows.seqs:
            row.resolve(self._previous)
        logits = self.runner.run(rows)[0]
        tokens, logprobs = self.sampler(logits, sampled)
        self._previous = tokens
        return tokens, logprobs

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
