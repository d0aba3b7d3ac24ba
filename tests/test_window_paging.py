"""Sliding-window layers page apart from full ones (engine/kv_cache.py): the shared superblock allocator, a
sequence giving back the windowed pages that left its window, the prefix cache reusing only prefixes whose last
window it still holds, and the KV memory figure for Gemma 3's layout at 8k tokens of context.

Token-exactness against transformers with windowed paging (every backend that supports it, compiled and eager,
prefix cache, preemption) is tests/test_model_families.py's gemma3 rows and tests/test_gemma3.py."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import PROMPTS, hf_greedy, save_checkpoint, trim_at_eos

from engine import LLM, SamplingParams
from engine.kv_cache import SCRATCH_PAGE, grouped_allocators
from engine.kv_manager import KVManager
from engine.radix_cache import RadixCache
from engine.sequence import Sequence


def test_superblocks_serve_either_group_and_count_holders():
    full, windowed = grouped_allocators(5 * 2, full_layers=1, window_layers=2)  # 5 superblocks of 2 layer-pages
    assert (full.capacity, windowed.capacity) == (8, 4)  # superblock 0 is scratch
    pages = full.alloc(3)  # two superblocks claimed by the full group
    assert full.num_free == 5 and windowed.num_free == 2
    assert windowed.alloc(3) is None  # only two superblocks left
    w = windowed.alloc(2)
    assert full.num_free == 1 and full.alloc(2) is None  # its half-used superblock has one page left
    windowed.share(w[0])
    windowed.free([w[0]])
    assert windowed.holders(w[0]) == 1 and full.num_free == 1  # still held once
    windowed.free(w)
    full.free(pages)
    assert full.num_free == 8 and windowed.num_free == 4 and full.space.free_layer_pages == 8
    with pytest.raises(RuntimeError):
        windowed.free([w[1]])


PS, WINDOW = 4, 8


def _manager(cache: bool = True, num_layer_pages: int = 3 * 64) -> KVManager:
    full, windowed = grouped_allocators(num_layer_pages, full_layers=1, window_layers=2)
    prefix = RadixCache(full, PS, windowed)
    return KVManager(full, prefix, PS, windowed, WINDOW)


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(f"s{random.random()}", tokens, SamplingParams(max_tokens=8), 0)


def _compute(kv: KVManager, seq: Sequence, upto: int) -> None:
    """What scheduling and running do: pages for the next chunk, then its K/V counted."""
    assert kv.ensure_capacity(seq, upto)
    seq.num_computed_tokens = upto
    kv.cache_computed(seq)


def test_a_sequence_gives_back_the_pages_that_left_its_window():
    kv = _manager()
    seq = _seq(list(range(40)))
    assert kv.admit(seq, max_new_tokens=8)
    assert len(seq.pages) == 10 and len(seq.window_pages) == 2  # windowed pages only for the scheduled chunk
    for upto in range(8, 41, 8):
        _compute(kv, seq, upto)
    assert kv.ensure_capacity(seq, 41)  # the next query, at position 40, sees positions 33..40: pages 8..10
    assert seq.window_pages[:8] == [SCRATCH_PAGE] * 8 and SCRATCH_PAGE not in seq.window_pages[8:]
    # The prefix cache still holds the dropped ones (nobody else does): evictable, not held by the sequence.
    assert kv.cache.evictable_window_pages == 8
    kv.release(seq)
    kv.cache.reset()
    assert kv.allocator.space.free_layer_pages == kv.allocator.capacity * kv.allocator.layers  # all back


def test_only_prefixes_whose_window_is_held_are_reused():
    kv = _manager()
    prompt = list(range(100, 140))
    a = _seq(prompt + [1])
    assert kv.admit(a)
    _compute(kv, a, 41)
    kv.release(a)
    b = _seq(prompt + [2])
    assert kv.prefix_match_length(b) == 40  # the tree shared every windowed page of a's prompt
    # Drop the tree's windowed pages of the last page but one: a query at position 40 would need them.
    tail = [n for n in kv.cache._nodes() if n.window_pages and n.window_pages[-1] != SCRATCH_PAGE]
    assert len(tail) == 1
    kv.window_allocator.free([tail[0].window_pages[-2]])
    tail[0].window_pages[-2] = SCRATCH_PAGE
    # Reusable now: only prefixes ending before that page, whose own last window is held (8 pages of 4).
    assert kv.prefix_match_length(b) == 32
    assert kv.admit(b)
    assert b.num_computed_tokens == 32 and b.window_pages[:6] == [SCRATCH_PAGE] * 6
    assert SCRATCH_PAGE not in b.window_pages[6:]
    kv.release(b)
    kv.cache.evict(kv.cache.evictable_window_pages, windowed=True)
    assert kv.prefix_match_length(_seq(prompt + [3])) == 0  # nothing held: nothing reused, nothing wrong


def test_window_pages_only_the_tree_holds_are_evicted_when_the_pool_runs_dry():
    kv = _manager(num_layer_pages=2 * 18)  # 18 superblocks of 2 layer-pages: 17 usable
    a = _seq(list(range(200, 233)))
    assert kv.admit(a, max_new_tokens=8)
    for upto in (8, 16, 24, 32, 33):
        _compute(kv, a, upto)
    assert kv.ensure_capacity(a, 34)  # a drops pages 0..5; the tree, which a locks, keeps them
    assert kv.cache.evictable_window_pages == 6 and kv.cache.evictable_pages == 0
    b = _seq(list(range(300, 320)))  # shares nothing; the pool is one superblock short
    assert kv.admit(b, max_new_tokens=8)
    assert kv.cache.evictable_window_pages == 5
    assert kv.prefix_match_length(_seq(list(range(200, 233)))) == 32  # a's last window is still held
    for s in (a, b):
        kv.release(s)
    kv.cache.reset()
    assert kv.allocator.num_free == kv.allocator.capacity


def test_the_trees_page_counts_follow_every_change():
    """total_pages and total_window_pages are counted as the tree changes (stats read them every step): after
    inserts sharing prefixes, splits, windows dropped, both kinds of eviction, they equal a walk of the tree."""
    kv = _manager(num_layer_pages=3 * 48)
    rng = random.Random(0)
    stems = [[rng.randrange(1000) for _ in range(12)] for _ in range(3)]

    def walked() -> tuple[int, int]:
        nodes = kv.cache._nodes()
        held = sum(p != SCRATCH_PAGE for n in nodes for p in n.window_pages)
        return sum(len(n.pages) for n in nodes), held

    for i in range(12):
        seq = _seq(stems[i % 3] + [rng.randrange(1000) for _ in range(rng.randrange(4, 30))])
        if not kv.admit(seq, max_new_tokens=8):
            kv.cache.evict(kv.cache.evictable_pages)
            assert (kv.cache.total_pages, kv.cache.total_window_pages) == walked()
            assert kv.admit(seq, max_new_tokens=8)
        for upto in range(seq.num_computed_tokens + 8, len(seq.token_ids) + 8, 8):
            _compute(kv, seq, min(upto, len(seq.token_ids)))
        kv.release(seq)
        assert (kv.cache.total_pages, kv.cache.total_window_pages) == walked()
        if i % 4 == 3:
            kv.cache.evict(3, windowed=True)
            assert (kv.cache.total_pages, kv.cache.total_window_pages) == walked()
    assert kv.cache.total_pages > 0 and kv.cache.total_window_pages > 0
    kv.cache.reset()
    assert (kv.cache.total_pages, kv.cache.total_window_pages) == walked() == (0, 0)


def _gemma_like(path, layers: int, window: int, context: int):
    """A tiny checkpoint with Gemma 3's layout: a full layer after every five sliding ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        num_hidden_layers=layers,
        sliding_window=window,
        layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)],
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return save_checkpoint(Gemma3ForCausalLM(cfg).eval(), path)


@pytest.mark.parametrize("cache", ["none", "radix"])
def test_kv_held_at_8k_tokens_with_gemma3_layout(tmp_path, cache):
    """The issue's figure, from the allocator's own accounting: Gemma-3-270M's layout (18 layers, 15 sliding
    over 512 tokens), 8192 tokens of context. Keeping every layer whole would hold 18 x 512 layer-pages; here
    ≤ 0.3x of it, in a pool that could not hold the context whole (0.4x of it)."""
    path = _gemma_like(tmp_path, layers=18, window=512, context=16384)
    llm = LLM(str(path), dtype=torch.float32, enforce_eager=True, cache=cache, num_pages=int(0.4 * 8192 / 16))
    engine = llm.engine
    assert engine.window_allocator is not None and engine.max_model_len > 8192
    prompt = random.Random(0).choices(range(1000, 100000), k=8192)
    engine.add_sequence("long", prompt, SamplingParams(max_tokens=4, temperature=0))
    seq = engine.seqs["long"]
    while seq.num_output_tokens < 2:
        engine.step()
    full, windowed = engine.allocator, engine.window_allocator
    held_windowed = sum(p != SCRATCH_PAGE for p in seq.window_pages)
    by_sequence = full.layers * len(seq.pages) + windowed.layers * held_windowed
    # The allocator agrees: what is not free is the sequence's, or the prefix cache's to evict.
    cache_pages = engine.prefix_cache
    cached = cache_pages.evictable_pages * full.layers + cache_pages.evictable_window_pages * windowed.layers
    used = full.capacity * full.layers - full.space.free_layer_pages
    assert used - (cached if cache == "radix" else 0) == by_sequence
    ratio = by_sequence / (18 * len(seq.pages))
    assert ratio <= 0.3, f"windowed paging holds {ratio:.3f}x of keeping every layer whole"
    while engine.seqs:
        engine.step()
    assert engine.stats()["kv_pages_free"] + engine.stats()["kv_pages_evictable"] == pytest.approx(
        engine.stats()["kv_pages_total"]
    )


@pytest.mark.parametrize("options", [{"attention": "flex"}, {"kv_cache.window_pages": False}])
def test_every_layer_stays_whole_with_flex_or_when_asked(tmp_path, options):
    path = _gemma_like(tmp_path, layers=6, window=8, context=1024)
    llm = LLM(str(path), dtype=torch.float32, enforce_eager=True, **options)
    assert llm.engine.window_allocator is None and llm.engine.runner.windowed is False
    assert isinstance(llm.engine.stats()["kv_pages_total"], int)


def test_speculation_and_windowed_pages_keep_greedy_output(tmp_path):
    """Rejected drafts give back windowed pages too; greedy output equals transformers' and spec=none's."""
    from transformers import AutoModelForCausalLM

    path = _gemma_like(tmp_path, layers=6, window=8, context=1024)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(
        str(path),
        dtype=torch.float32,
        enforce_eager=True,
        spec="ngram",
        page_size=4,
        **{"spec.only_when_faster": False},
    )
    ids = [llm.encode(p * 3) for p in PROMPTS[:4]]
    expected = hf_greedy(hf, ids, 24)
    outs = llm.generate_outputs(ids, max_tokens=24, temperature=0)
    eos = llm.engine.eos_token_ids
    assert [o.outputs[0].token_ids for o in outs] == [trim_at_eos(e, eos) for e in expected]
    s = llm.engine.stats()
    assert s["spec_proposed_tokens"] > 0
    assert s["kv_pages_free"] + s["kv_pages_evictable"] == pytest.approx(s["kv_pages_total"])
