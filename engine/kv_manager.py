"""Page bookkeeping per sequence: prefix reuse, allocation with eviction, hand-over to the prefix cache, and
for models with sliding-window layers the windowed group's pages (engine/kv_cache.py): allocated as tokens
are scheduled, given back once they leave the window."""

from __future__ import annotations

import math

from engine.kv_cache import SCRATCH_PAGE, PageAllocator
from engine.prefix_cache import PrefixCache
from engine.sequence import Sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVManager:
    def __init__(
        self,
        allocator: PageAllocator,
        prefix_cache: PrefixCache,
        page_size: int,
        window_allocator: PageAllocator | None = None,
        window: int = 0,
        invariant_chunk: int = 0,
    ) -> None:
        self.allocator = allocator
        self.cache = prefix_cache
        self.page_size = page_size
        self.window_allocator = window_allocator  # None: every layer keeps every page
        self.window = window  # the windowed layers' widest window
        # Batch-invariant mode (engine/scheduler.py) computes prompts in chunks of `invariant_chunk` tokens, and a
        # token's K/V bits depend on the chunk that computed it (its length shapes the attention call): the cache
        # then shares only whole chunks of prompt tokens, and a prefix is reused only up to a chunk's end.
        self.invariant_chunk = invariant_chunk
        self.reuse_pages = math.lcm(invariant_chunk, page_size) // page_size if invariant_chunk else 1

    def _alloc(self, n: int, evict: bool = True, windowed: bool = False) -> list[int] | None:
        allocator = self.window_allocator if windowed else self.allocator
        while evict and n > allocator.num_free:
            # The groups share superblocks: the other group's cached pages may be what frees one.
            short = n - allocator.num_free
            if not self.cache.evict(short, windowed) and not (
                self.window_allocator is not None and self.cache.evict(short, not windowed)
            ):
                break
        return allocator.alloc(n)

    def _first_seen_page(self, position: int) -> int:
        """The first page a query at `position` sees through the window (earlier ones are dropped)."""
        return max(0, position - self.window + 1) // self.page_size

    def _reusable_prefix(self, seq: Sequence) -> list[int]:
        # The last token is always recomputed: its logits are needed to sample the next one.
        return seq.token_ids[: seq.num_tokens - 1]

    def _match(self, tokens: list[int]) -> tuple[object, list[int], list[int]]:
        """The cached prefix of `tokens` to reuse: handle, pages, and windowed pages. With windowed layers only
        a prefix whose last window is still held counts: what was dropped is recomputed, never reused."""
        node, pages = self.cache.match(tokens)
        held = self.cache.match_window(node) if self.window_allocator is not None and pages else []
        n = self._usable(len(pages), held)
        if n < len(pages):
            node, pages = self.cache.match(tokens[: n * self.page_size])
            held = held[:n]
        return node, pages, held

    def _usable(self, n: int, held: list[int]) -> int:
        """How many of n matched pages can be reused: a multiple of `reuse_pages` whose last window is held."""
        while n:
            n -= n % self.reuse_pages
            if not held or SCRATCH_PAGE not in held[self._first_seen_page(n * self.page_size) : n]:
                return n
            n -= 1
        return 0

    def prefix_match_length(self, seq: Sequence) -> int:
        return 0 if seq.wants_prompt_logprobs else len(self._match(self._reusable_prefix(seq))[1]) * self.page_size

    def admit(self, seq: Sequence, max_new_tokens: int | None = None) -> bool:
        """Reuse the cached prefix and allocate pages for all current tokens (the windowed group only for the
        first `max_new_tokens` to compute); False if KV is short."""
        assert not seq.pages and seq.cache_node is None
        node, cached, held = (None, [], []) if seq.wants_prompt_logprobs else self._match(self._reusable_prefix(seq))
        self.cache.lock(node)  # before allocating, so eviction cannot take the matched pages
        fresh = self._alloc(pages_needed(seq.num_tokens, self.page_size) - len(cached))
        if fresh is None:
            self.cache.unlock(node)
            return False
        computed = len(cached) * self.page_size
        if self.window_allocator is not None:
            first = self._first_seen_page(computed)
            upto = seq.num_tokens if max_new_tokens is None else min(seq.num_tokens, computed + max_new_tokens)
            fresh_windowed = self._alloc(pages_needed(upto, self.page_size) - len(cached), windowed=True)
            if fresh_windowed is None:
                self.allocator.free(fresh)
                self.cache.unlock(node)
                return False
            for page in held[first:]:
                self.window_allocator.share(page)
            seq.window_pages = [SCRATCH_PAGE] * first + held[first:] + fresh_windowed
        seq.cache_node = node
        seq.pages = cached + fresh
        seq.num_tree_pages = len(cached)
        seq.num_computed_tokens = computed
        if seq.num_output_tokens == 0:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        return True

    def ensure_capacity(self, seq: Sequence, num_tokens: int, evict: bool = True) -> bool:
        """Make room for K/V of `num_tokens` tokens (evicting cached prefixes if `evict`); False if the pool
        is exhausted. Windowed pages the next query no longer sees go back first."""
        needed = pages_needed(num_tokens, self.page_size)
        fresh = self._alloc(max(0, needed - len(seq.pages)), evict)
        if fresh is None:
            return False
        if self.window_allocator is not None:
            self._drop_out_of_window(seq)
            fresh_windowed = self._alloc(max(0, needed - len(seq.window_pages)), evict, windowed=True)
            if fresh_windowed is None:
                self.allocator.free(fresh)
                return False
            seq.window_pages.extend(fresh_windowed)
        seq.pages.extend(fresh)
        return True

    def _drop_out_of_window(self, seq: Sequence) -> None:
        """Give back the windowed pages before the window of the next query (dropped ones lead the list)."""
        held = seq.window_pages
        for i in range(min(self._first_seen_page(seq.num_computed_tokens), len(held)) - 1, -1, -1):
            if held[i] == SCRATCH_PAGE:
                break
            self.window_allocator.free([held[i]])
            held[i] = SCRATCH_PAGE

    def trim(self, seq: Sequence) -> None:
        """Free the pages past what the sequence's tokens need (those a rejected draft's K/V went to)."""
        keep = pages_needed(seq.num_tokens, self.page_size)
        for pages, allocator in ((seq.pages, self.allocator), (seq.window_pages, self.window_allocator)):
            if len(pages) > keep:
                allocator.free([p for p in pages[keep:] if p != SCRATCH_PAGE])
                del pages[keep:]

    def cache_computed(self, seq: Sequence) -> None:
        """Hand the sequence's fully computed pages to the prefix cache (so others can reuse them now)."""
        full = seq.num_computed_tokens // self.page_size
        if self.invariant_chunk:  # prompt tokens of whole chunks only (decode rows' K/V are computed otherwise)
            full = min(full, seq.num_prompt_tokens // self.page_size // self.reuse_pages * self.reuse_pages)
        if full <= seq.num_tree_pages:
            return
        windowed = seq.window_pages[:full] if self.window_allocator is not None else None
        node, tree_pages = self.cache.insert(seq.token_ids[: full * self.page_size], seq.pages[:full], windowed)
        self.cache.lock(node)
        self.cache.unlock(seq.cache_node)
        seq.cache_node = node
        seq.pages[: len(tree_pages)] = tree_pages
        seq.num_tree_pages = len(tree_pages)

    def release(self, seq: Sequence) -> None:
        """The sequence stops holding KV (finished, aborted or preempted): cache what is reusable, free the rest."""
        self.cache_computed(seq)
        self.cache.unlock(seq.cache_node)
        self.allocator.free(seq.pages[seq.num_tree_pages :])
        if self.window_allocator is not None:
            self.window_allocator.free([p for p in seq.window_pages if p != SCRATCH_PAGE])
        seq.pages, seq.window_pages, seq.cache_node, seq.num_tree_pages, seq.num_computed_tokens = [], [], None, 0, 0
