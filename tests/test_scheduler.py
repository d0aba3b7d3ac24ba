"""The Scheduler and KVManager on their own, with sequences made by hand and no model: the token budget,
chunked prefill, preemption (its order under each admission policy, and the pages it gives back), pages freed
on finish and abort, and prefix-cache hits counted."""

from __future__ import annotations

import itertools

import pytest

from engine.kv_cache import PageAllocator
from engine.kv_manager import KVManager
from engine.policies.fcfs import FCFS
from engine.policies.lpm import LongestPrefixMatch
from engine.policies.priority import Priority
from engine.prefix_cache import NoPrefixCache
from engine.radix_cache import RadixCache
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, Status

PAGE = 4
_arrivals = itertools.count()


def make(num_pages: int, budget: int, policy=None, cache: str = "radix", max_running: int = 8) -> Scheduler:
    allocator = PageAllocator(num_pages)
    prefix = RadixCache(allocator, PAGE) if cache == "radix" else NoPrefixCache(allocator, PAGE)
    return Scheduler(KVManager(allocator, prefix, PAGE), policy or FCFS(), max_running, budget)


def seq(prompt: list[int] | int, priority: int = 0) -> Sequence:
    ids = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Sequence(f"s{next(_arrivals)}", ids, SamplingParams(max_tokens=64, priority=priority), next(_arrivals))


def run(batch: ScheduledBatch, token: int = 7) -> None:
    """What the engine does after the model ran: the scheduled tokens now have K/V, sampling rows get one more."""
    rows = set(batch.sampling_rows)
    for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        s.num_computed_tokens += n
        if i in rows:
            s.token_ids.append(token)


def pages_all_back(sched: Scheduler) -> bool:
    kv = sched.kv
    return kv.allocator.num_free + kv.cache.evictable_pages == kv.allocator.capacity


def test_the_token_budget_chunks_prefills_and_leaves_room_for_decodes():
    sched = make(num_pages=64, budget=16)
    a, b, c = seq(10), seq(10), seq(10)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [a.seq_id, b.seq_id] and batch.num_new_tokens == [10, 6]
    assert batch.sampling_rows == [0]  # b's chunk does not reach its last token yet
    run(batch)
    batch = sched.schedule()
    # a decodes one token, b finishes its prompt, c fits in what is left of the budget (11)
    assert batch.num_new_tokens == [1, 4, 10] and [s.seq_id for s in batch.seqs] == [a.seq_id, b.seq_id, c.seq_id]
    assert not batch.is_decode_only
    run(batch)
    assert sched.schedule().num_new_tokens == [1, 1, 1]


def test_max_running_caps_admission():
    sched = make(num_pages=64, budget=100, max_running=2)
    for _ in range(3):
        sched.add(seq(5))
    assert len(sched.schedule().seqs) == 2 and len(sched.waiting) == 1


@pytest.mark.parametrize("policy", [FCFS(), LongestPrefixMatch(), Priority()], ids=["fcfs", "lpm", "priority"])
def test_preemption_takes_the_newest_and_gives_its_pages_back(policy):
    # 7 usable pages of 4 tokens: three sequences of 8 tokens fill 6; growing past them needs the newest's pages.
    sched = make(num_pages=8, budget=64, policy=policy, cache="none")
    first, second, third = seq(8, priority=2), seq(8, priority=1), seq(8, priority=0)
    for s in (first, second, third):
        sched.add(s)
    run(sched.schedule())
    assert {s.status for s in (first, second, third)} == {Status.RUNNING}
    for _ in range(4):  # each decodes until a fourth page is needed
        run(sched.schedule())
    newest = max((first, second, third), key=lambda s: s.arrival)
    assert newest.status is Status.WAITING and newest.num_preemptions == 1 and newest.pages == []
    assert sched.waiting[0] is newest and sched.num_preemptions == 1
    # readmitted first once pages free up, and recomputes its prompt and output from scratch
    sched.finish(first, "stop")
    batch = sched.schedule()
    assert newest in batch.seqs and batch.num_new_tokens[batch.seqs.index(newest)] == newest.num_tokens
    for s in (second, newest):
        sched.finish(s, "abort")
    assert pages_all_back(sched)


def test_admission_order_follows_the_policy():
    shared = list(range(500, 516))  # 4 full pages
    warm = make(num_pages=64, budget=64, policy=LongestPrefixMatch())
    owner = seq(shared + [1])
    warm.add(owner)
    run(warm.schedule())
    warm.kv.cache_computed(owner)
    warm.finish(owner, "stop")
    cold, hot = seq(list(range(900, 917))), seq(shared + [2])
    warm.max_running = 1
    for s in (cold, hot):
        warm.add(s)
    assert warm.schedule().seqs == [hot]  # the longest cached prefix first, though it arrived last

    sched = make(num_pages=64, budget=64, policy=Priority(), max_running=1)
    low, urgent = seq(5, priority=5), seq(5, priority=-1)
    for s in (low, urgent):
        sched.add(s)
    assert sched.schedule().seqs == [urgent]


def test_prefix_cache_hits_are_counted_and_pages_shared():
    sched = make(num_pages=32, budget=64)
    prompt = list(range(300, 313))  # 13 tokens: 3 full pages reusable (the last token is always recomputed)
    a = seq(prompt)
    sched.add(a)
    run(sched.schedule())
    sched.kv.cache_computed(a)
    b = seq(prompt)
    sched.add(b)
    batch = sched.schedule()
    assert b.num_cached_prompt_tokens == 12 and b.num_computed_tokens == 12
    assert batch.num_new_tokens[batch.seqs.index(b)] == 1
    assert b.pages[:3] == a.pages[:3]  # the same physical pages
    for s in (a, b):
        sched.finish(s, "stop")
    assert pages_all_back(sched)


def test_finish_and_abort_free_pages_wherever_the_sequence_is():
    sched = make(num_pages=16, budget=8)
    running, chunked, waiting = seq(4), seq(12), seq(4)
    for s in (running, chunked, waiting):
        sched.add(s)
    run(sched.schedule())  # running: 4 tokens; chunked: 4 of its 12; waiting: no budget left
    assert waiting.status is Status.WAITING and chunked.num_computed_tokens == 4
    sched.finish(chunked, "abort")  # mid-prefill
    sched.finish(waiting, "abort")  # never admitted
    sched.finish(running, "stop")
    assert not sched.has_work() and pages_all_back(sched)
    assert {s.status for s in (running, chunked, waiting)} == {Status.FINISHED}


def test_batch_invariant_steps_never_mix_decode_and_prompt_rows_and_cut_prompts_at_fixed_places():
    """`batch_invariant`: a step holds decode rows or prompt rows, taking turns while both wait, and a prompt's
    chunks end at multiples of the budget (or at its end) whatever else arrived, so a prompt row sees the
    same chunk alone and in any batch."""
    sched = make(num_pages=128, budget=16)
    sched.batch_invariant = True
    seqs = [seq(10), seq(40), seq(10), seq(23)]
    chunk_ends: dict[str, list[int]] = {s.seq_id: [] for s in seqs}
    kinds = []
    for i, s in enumerate(seqs):
        sched.add(s)
        for _ in range(3 if i < len(seqs) - 1 else 40):
            batch = sched.schedule()
            decode = [s.num_tokens - s.num_computed_tokens == 1 for s in batch.seqs]
            assert batch.seqs and len(set(decode)) == 1, (batch.num_new_tokens, decode)
            kinds.append(decode[0])
            for s, n, d in zip(batch.seqs, batch.num_new_tokens, decode):
                if not d:
                    chunk_ends[s.seq_id].append(s.num_computed_tokens + n)
            run(batch)
    assert all(len(s.token_ids) > s.num_prompt_tokens for s in seqs)
    assert [chunk_ends[s.seq_id] for s in seqs] == [[10], [16, 32, 40], [10], [16, 23]]
    assert any(a != b for a, b in zip(kinds, kinds[1:]))  # turns: decode rows were not starved by prompts
