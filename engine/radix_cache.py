"""The radix-tree prefix cache over the paged pool (`cache=radix`).

`RadixCache` keeps computed KV pages in a radix tree keyed by token ids, one edge label being a whole
number of pages. Sequences lock the node their prefix ends at (a reference count on the path to the
root); unlocked leaves are evicted least-recently-used first when the allocator runs dry. With windowed
layers each node also lists the windowed page of each of its pages (SCRATCH_PAGE where none is held);
those are shared with the sequences by reference count and dropped, oldest nodes first, when the windowed
group runs dry and no sequence holds them.
"""

from __future__ import annotations

import heapq
import itertools

from engine.kv_cache import SCRATCH_PAGE, PageAllocator
from engine.prefix_cache import PrefixCache


class _Node:
    __slots__ = ("key", "pages", "window_pages", "parent", "children", "lock_ref", "last_access")

    def __init__(
        self, key: tuple[int, ...], pages: list[int], parent: _Node | None, window_pages: list[int] | None = None
    ) -> None:
        self.key = key
        self.pages = pages
        self.window_pages = window_pages or []  # empty when the model has no windowed group
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.lock_ref = 0
        self.last_access = 0

    def __lt__(self, other: _Node) -> bool:  # heap order for eviction
        return self.last_access < other.last_access


class RadixCache(PrefixCache):
    def __init__(self, allocator: PageAllocator, page_size: int, window_allocator: PageAllocator | None = None) -> None:
        super().__init__(allocator, page_size, window_allocator)
        self.root = _Node((), [], None)
        self.root.lock_ref = 1  # never evicted
        self._evictable = 0
        # Counted as they change: `stats()` reads them every step, and walking a tree of 500 nodes (12,000 pages)
        # took 0.23 ms each time.
        self._pages = 0
        self._window_pages = 0
        self._clock = itertools.count(1)

    # -- lookup ------------------------------------------------------------------------------------

    def _page_key(self, tokens: list[int] | tuple[int, ...], page: int) -> tuple[int, ...]:
        return tuple(tokens[page * self.page_size : (page + 1) * self.page_size])

    def _common_pages(self, node: _Node, tokens: list[int], start_page: int, max_pages: int) -> int:
        n = 0
        while n < min(len(node.pages), max_pages) and self._page_key(node.key, n) == self._page_key(
            tokens, start_page + n
        ):
            n += 1
        return n

    def match(self, tokens: list[int]) -> tuple[_Node, list[int]]:
        """Deepest node whose path is a page-aligned prefix of `tokens`, and the pages along that path."""
        total = len(tokens) // self.page_size
        node, pages, i = self.root, [], 0
        now = next(self._clock)
        while i < total:
            child = node.children.get(self._page_key(tokens, i))
            if child is None:
                break
            k = self._common_pages(child, tokens, i, total - i)
            if k < len(child.pages):
                child = self._split(child, k)
            child.last_access = now
            pages.extend(child.pages)
            i += k
            node = child
        return node, pages

    def match_window(self, node: _Node) -> list[int]:
        parts = []
        while node is not None:
            parts.append(node.window_pages)
            node = node.parent
        return [p for part in reversed(parts) for p in part]

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node`'s edge after k pages; returns the new upper half."""
        cut = k * self.page_size
        upper = _Node(node.key[:cut], node.pages[:k], node.parent, node.window_pages[:k])
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        node.parent.children[upper.key[: self.page_size]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[k:], upper
        node.window_pages = node.window_pages[k:]
        upper.children[node.key[: self.page_size]] = node
        return upper

    # -- insert --------------------------------------------------------------------------------------

    def insert(
        self, tokens: list[int], pages: list[int], window_pages: list[int] | None = None
    ) -> tuple[_Node, list[int]]:
        """Give the tree `pages` holding KV of `tokens` (len(pages) full pages), and share the caller's
        `window_pages` the tree lacks.

        Returns the node the prefix ends at and the tree's pages for it. Where the tree already held a
        page for the same tokens (another sequence computed it first), the caller's copy is freed and the
        tree's is returned instead, so the caller must replace its page table entries with the result.
        """
        assert len(tokens) == len(pages) * self.page_size
        node, i, out = self.root, 0, []
        now = next(self._clock)
        while i < len(pages):
            child = node.children.get(self._page_key(tokens, i))
            if child is None:
                new = _Node(tuple(tokens[i * self.page_size :]), list(pages[i:]), node)
                if window_pages is not None:
                    new.window_pages = [SCRATCH_PAGE] * len(new.pages)
                    self._share_window(new, window_pages[i:])
                new.last_access = now
                node.children[new.key[: self.page_size]] = new
                self._evictable += len(new.pages)
                self._pages += len(new.pages)
                return new, out + new.pages
            k = self._common_pages(child, tokens, i, len(pages) - i)
            if k < len(child.pages):
                child = self._split(child, k)
            duplicates = [own for own, tree in zip(pages[i : i + k], child.pages) if own != tree]
            self.allocator.free(duplicates)
            if window_pages is not None:
                self._share_window(child, window_pages[i : i + k])
            child.last_access = now
            out.extend(child.pages)
            i += k
            node = child
        return node, out

    def _share_window(self, node: _Node, window_pages: list[int]) -> None:
        """Hold the caller's windowed pages where `node` holds none (the caller keeps its own hold)."""
        for j, page in enumerate(window_pages[: len(node.window_pages)]):
            if node.window_pages[j] == SCRATCH_PAGE and page != SCRATCH_PAGE:
                self.window_allocator.share(page)
                node.window_pages[j] = page
                self._window_pages += 1

    # -- reference counts and eviction ---------------------------------------------------------------

    def lock(self, node: _Node | None) -> None:
        while node is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: _Node | None) -> None:
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "prefix cache node unlocked more often than locked"
            if node.lock_ref == 0:
                self._evictable += len(node.pages)
            node = node.parent

    def evict(self, num_pages: int, windowed: bool = False) -> int:
        """Free at least `num_pages` unreferenced pages if possible, oldest leaves first (windowed pages:
        from the oldest nodes, leaving the nodes in place); returns freed."""
        if windowed:
            return self._evict_windowed(num_pages)
        heap = [n for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            leaf = heapq.heappop(heap)
            self.allocator.free(leaf.pages)
            if leaf.window_pages:  # nobody else holds them: a sequence holding one would lock the leaf
                held = [p for p in leaf.window_pages if p != SCRATCH_PAGE]
                self.window_allocator.free(held)
                self._window_pages -= len(held)
            freed += len(leaf.pages)
            self._evictable -= len(leaf.pages)
            self._pages -= len(leaf.pages)
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    def _evict_windowed(self, num_pages: int) -> int:
        freed = 0
        for node in sorted(self._nodes(), key=lambda n: n.last_access):
            for j, page in enumerate(node.window_pages):
                if freed >= num_pages:
                    return freed
                if page != SCRATCH_PAGE and self.window_allocator.holders(page) == 1:
                    self.window_allocator.free([page])
                    node.window_pages[j] = SCRATCH_PAGE
                    self._window_pages -= 1
                    freed += 1
        return freed

    def _nodes(self) -> list[_Node]:
        stack, nodes = [self.root], []
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    @property
    def evictable_window_pages(self) -> int:
        # A walk: whether a page is the tree's alone changes as sequences let go of theirs. Only models with
        # windowed layers have any.
        if not self._window_pages:
            return 0
        held = (p for node in self._nodes() for p in node.window_pages if p != SCRATCH_PAGE)
        return sum(self.window_allocator.holders(p) == 1 for p in held)

    @property
    def total_window_pages(self) -> int:
        return self._window_pages

    def _leaves(self) -> list[_Node]:
        stack, leaves = [self.root], []
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves

    @property
    def total_pages(self) -> int:
        return self._pages

    @property
    def evictable_pages(self) -> int:
        return self._evictable
