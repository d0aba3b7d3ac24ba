"""The prefix-cache interface `KVManager` is written against (`cache=` picks an implementation), and
`NoPrefixCache`, which shares nothing. `RadixCache` (engine/radix_cache.py) is the one that shares.

A prefix cache owns the KV pages it has been given for token prefixes, hands them to sequences whose
prompts start with the same tokens, and frees unreferenced ones when the allocator runs dry. A handle
(`match`/`insert` return one) names where a prefix ends; a sequence keeps its handle locked while it
uses those pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from engine.kv_cache import PageAllocator

Handle = Any  # implementation-defined; None means "nothing cached"


class PrefixCache(ABC):
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size

    @abstractmethod
    def match(self, tokens: list[int]) -> tuple[Handle, list[int]]:
        """The longest page-aligned cached prefix of `tokens`: its handle and its pages in order."""

    def match_length(self, tokens: list[int]) -> int:
        """Tokens of `tokens` already cached (a multiple of the page size)."""
        return len(self.match(tokens)[1]) * self.page_size

    @abstractmethod
    def insert(self, tokens: list[int], pages: list[int]) -> tuple[Handle, list[int]]:
        """Take `pages` (full pages holding the K/V of `tokens`). Returns the handle and the cache's own
        pages for them: where it already held a page for the same tokens it frees the caller's copy, so the
        caller must use the returned pages from now on."""

    @abstractmethod
    def lock(self, handle: Handle) -> None:
        """Keep the prefix ending at `handle` from eviction (reference counted)."""

    @abstractmethod
    def unlock(self, handle: Handle) -> None:
        """Undo one `lock`."""

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` unreferenced pages if possible; returns how many were freed."""

    @property
    @abstractmethod
    def evictable_pages(self) -> int:
        """Pages that `evict` could free now."""

    @property
    @abstractmethod
    def total_pages(self) -> int:
        """Pages the cache holds, referenced or not."""

    def reset(self) -> None:
        """Drop every unreferenced page (e.g. between benchmark runs)."""
        self.evict(self.evictable_pages)


class NoPrefixCache(PrefixCache):
    """No sharing: sequences own all their pages and nothing outlives them."""

    evictable_pages = 0
    total_pages = 0

    def match(self, tokens: list[int]) -> tuple[None, list[int]]:
        return None, []

    def insert(self, tokens: list[int], pages: list[int]) -> tuple[None, list[int]]:
        return None, []

    def lock(self, handle: None) -> None:
        pass

    def unlock(self, handle: None) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0
