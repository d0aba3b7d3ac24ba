"""Radix prefix cache and page allocator: matching, splitting, reference counts, LRU eviction, no leaks."""

from __future__ import annotations

import pytest

from engine.kv_cache import PageAllocator
from engine.prefix_cache import NoPrefixCache
from engine.radix_cache import RadixCache

PS = 2


def make(num_pages: int = 32) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, PS)


def test_allocator_hands_out_distinct_pages_and_rejects_double_free():
    alloc = PageAllocator(5)
    assert alloc.capacity == 4
    pages = alloc.alloc(4)
    assert sorted(pages) == [1, 2, 3, 4]  # page 0 is the scratch page
    assert alloc.alloc(1) is None
    alloc.free(pages)
    assert alloc.num_free == 4
    with pytest.raises(RuntimeError):
        alloc.free([pages[0]])
    with pytest.raises(RuntimeError):
        alloc.free([0])


def test_match_is_page_aligned_and_splits_edges():
    alloc, cache = make()
    pages = alloc.alloc(3)
    node, tree_pages = cache.insert([1, 2, 3, 4, 5, 6], pages)
    assert tree_pages == pages
    # Shares two full pages; the third page differs.
    node2, matched = cache.match([1, 2, 3, 4, 9, 9, 9])
    assert matched == pages[:2]
    assert node2.key == (1, 2, 3, 4) and list(node2.children.values())[0].key == (5, 6)
    # A partial page never matches.
    assert cache.match([1, 2, 3])[1] == pages[:1]
    assert cache.match([7, 7, 7, 7])[1] == []


def test_insert_deduplicates_pages_already_in_the_tree():
    alloc, cache = make()
    first = alloc.alloc(2)
    cache.insert([1, 2, 3, 4], first)
    second = alloc.alloc(3)
    free_before = alloc.num_free
    node, tree_pages = cache.insert([1, 2, 3, 4, 5, 6], second)
    assert tree_pages == first + second[2:]  # the tree's copy wins
    assert alloc.num_free == free_before + 2  # the duplicates went back to the allocator
    assert cache.total_pages == 3


def test_locked_nodes_survive_eviction_and_lru_order():
    alloc, cache = make(8)
    a = alloc.alloc(2)
    node_a, _ = cache.insert([1, 1, 2, 2], a)
    b = alloc.alloc(2)
    node_b, _ = cache.insert([3, 3, 4, 4], b)
    c = alloc.alloc(2)
    cache.insert([5, 5, 6, 6], c)
    assert cache.evictable_pages == 6
    cache.lock(node_a)
    assert cache.evictable_pages == 4
    cache.match([5, 5, 6, 6])  # touch c: b is now the least recently used
    assert cache.evict(1) == 2  # a whole leaf goes
    assert cache.match([3, 3, 4, 4])[1] == []
    assert cache.match([5, 5, 6, 6])[1] == c
    assert cache.evict(100) == 2  # only c is left unlocked
    assert cache.match([1, 1, 2, 2])[1] == a
    cache.unlock(node_a)
    assert cache.evictable_pages == 2
    cache.evict(100)
    assert alloc.num_free == alloc.capacity and cache.total_pages == 0


def test_lock_counts_nest_and_cover_ancestors():
    alloc, cache = make()
    parent_pages = alloc.alloc(1)
    parent, _ = cache.insert([1, 1], parent_pages)
    child, _ = cache.insert([1, 1, 2, 2], parent_pages + alloc.alloc(1))
    cache.lock(child)
    cache.lock(child)
    assert parent.lock_ref == 2 and child.lock_ref == 2
    assert cache.evict(10) == 0
    cache.unlock(child)
    assert cache.evict(10) == 0
    cache.unlock(child)
    assert cache.evict(10) == 2  # child first, then the parent that became a leaf
    with pytest.raises(AssertionError):
        cache.unlock(child)


def test_no_prefix_cache_never_shares():
    alloc = PageAllocator(8)
    cache = NoPrefixCache(alloc, PS)
    assert cache.match([1, 2, 3, 4]) == (None, [])
    assert cache.insert([1, 2], alloc.alloc(1)) == (None, [])
    assert cache.evict(5) == 0
