"""Page bookkeeping per sequence: prefix reuse, allocation with eviction, hand-over to the prefix cache."""

from __future__ import annotations

from engine.kv_cache import PageAllocator
from engine.prefix_cache import PrefixCache
from engine.sequence import Sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVManager:
    def __init__(self, allocator: PageAllocator, prefix_cache: PrefixCache, page_size: int) -> None:
        self.allocator = allocator
        self.cache = prefix_cache
        self.page_size = page_size

    def _alloc(self, n: int, evict: bool = True) -> list[int] | None:
        short = n - self.allocator.num_free
        if short > 0 and evict:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def _reusable_prefix(self, seq: Sequence) -> list[int]:
        # The last token is always recomputed: its logits are needed to sample the next one.
        return seq.token_ids[: seq.num_tokens - 1]

    def prefix_match_length(self, seq: Sequence) -> int:
        return 0 if seq.wants_prompt_logprobs else self.cache.match_length(self._reusable_prefix(seq))

    def admit(self, seq: Sequence) -> bool:
        """Reuse the cached prefix and allocate pages for all current tokens; False if KV is short."""
        assert not seq.pages and seq.cache_node is None
        node, cached = (None, []) if seq.wants_prompt_logprobs else self.cache.match(self._reusable_prefix(seq))
        self.cache.lock(node)  # before allocating, so eviction cannot take the matched pages
        fresh = self._alloc(pages_needed(seq.num_tokens, self.page_size) - len(cached))
        if fresh is None:
            self.cache.unlock(node)
            return False
        seq.cache_node = node
        seq.pages = cached + fresh
        seq.num_tree_pages = len(cached)
        seq.num_computed_tokens = len(cached) * self.page_size
        if seq.num_output_tokens == 0:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        return True

    def ensure_capacity(self, seq: Sequence, num_tokens: int, evict: bool = True) -> bool:
        """Make room for K/V of `num_tokens` tokens (evicting cached prefixes if `evict`); False if the pool
        is exhausted."""
        short = pages_needed(num_tokens, self.page_size) - len(seq.pages)
        if short <= 0:
            return True
        fresh = self._alloc(short, evict)
        if fresh is None:
            return False
        seq.pages.extend(fresh)
        return True

    def trim(self, seq: Sequence) -> None:
        """Free the pages past what the sequence's tokens need (those a rejected draft's K/V went to)."""
        keep = pages_needed(seq.num_tokens, self.page_size)
        if len(seq.pages) > keep:
            self.allocator.free(seq.pages[keep:])
            del seq.pages[keep:]

    def cache_computed(self, seq: Sequence) -> None:
        """Hand the sequence's fully computed pages to the prefix cache (so others can reuse them now)."""
        full = seq.num_computed_tokens // self.page_size
        if full <= seq.num_tree_pages:
            return
        node, tree_pages = self.cache.insert(seq.token_ids[: full * self.page_size], seq.pages[:full])
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
        seq.pages, seq.cache_node, seq.num_tree_pages, seq.num_computed_tokens = [], None, 0, 0
