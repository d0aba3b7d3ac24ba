"""The prefix-cache interface `KVManager` is written against (`cache=` picks an implementation), and
`NoPrefixCache`, which shares nothing. `RadixCache` (engine/radix_cache.py) is the one that shares.

A prefix cache owns the KV pages it has been given for token prefixes, hands them to sequences whose
prompts start with the same tokens, and frees unreferenced ones when the allocator runs dry. A handle
(`match`/`insert` return one) names where a prefix ends; a sequence keeps its handle locked while it
uses those pages.

With sliding-window layers (engine/kv_cache.py) the cache also holds the windowed group's page of each cached
page where one is still held (sequences drop theirs once out of their window); `match_window` says which, so
that only a prefix whose last window is held is reused. Windowed pages are shared by reference count, and
`evict(..., windowed=True)` drops the ones no sequence holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from engine.kv_cache import PageAllocator

Handle = Any  # implementation-defined; None means "nothing cached"


class PrefixCache(ABC):
    def __init__(self, allocator: PageAllocator, page_size: int, window_allocator: PageAllocator | None = None) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.window_allocator = window_allocator

    @abstractmethod
    def match(self, tokens: list[int]) -> tuple[Handle, list[int]]:
        """The longest page-aligned cached prefix of `tokens`: its handle and its pages in order."""

    def match_length(self, tokens: list[int]) -> int:
        """Tokens of `tokens` already cached (a multiple of the page size)."""
        return len(self.match(tokens)[1]) * self.page_size

    @abstractmethod
    def match_window(self, handle: Handle) -> list[int]:
        """The windowed pages along the prefix ending at `handle` (SCRATCH_PAGE where none is held)."""

    @abstractmethod
    def insert(
        self, tokens: list[int], pages: list[int], window_pages: list[int] | None = None
    ) -> tuple[Handle, list[int]]:
        """Take `pages` (full pages holding the K/V of `tokens`). Returns the handle and the cache's own
        pages for them: where it already held a page for the same tokens it frees the caller's copy, so the
        caller must use the returned pages from now on. The caller's `window_pages` are shared (not taken)
        where the cache holds none for that page."""

    @abstractmethod
    def lock(self, handle: Handle) -> None:
        """Keep the prefix ending at `handle` from eviction (reference counted)."""

    @abstractmethod
    def unlock(self, handle: Handle) -> None:
        """Undo one `lock`."""

    @abstractmethod
    def evict(self, num_pages: int, windowed: bool = False) -> int:
        """Free at least `num_pages` unreferenced pages (of the windowed group if `windowed`) if possible;
        returns how many were freed."""

    @property
    @abstractmethod
    def evictable_pages(self) -> int:
        """Pages that `evict` could free now."""

    @property
    @abstractmethod
    def total_pages(self) -> int:
        """Pages the cache holds, referenced or not."""

    @property
    def evictable_window_pages(self) -> int:
        """Windowed pages that `evict(..., windowed=True)` could free now."""
        return 0

    @property
    def total_window_pages(self) -> int:
        return 0

    def reset(self) -> None:
        """Drop every unreferenced page (e.g. between benchmark runs)."""
        self.evict(self.evictable_pages)
        self.evict(self.evictable_window_pages, windowed=True)


class NoPrefixCache(PrefixCache):
    """No sharing: sequences own all their pages and nothing outlives them."""

    evictable_pages = 0
    total_pages = 0

    def match(self, tokens: list[int]) -> tuple[None, list[int]]:
        return None, []

    def match_window(self, handle: None) -> list[int]:
        return []

    def insert(
        self, tokens: list[int], pages: list[int], window_pages: list[int] | None = None
    ) -> tuple[None, list[int]]:
        return None, []

    def lock(self, handle: None) -> None:
        pass

    def unlock(self, handle: None) -> None:
        pass

    def evict(self, num_pages: int, windowed: bool = False) -> int:
        return 0
