"""Longest prefix match first (SGLang's LPM): the waiting sequence with the most cached prompt pages
goes first, so shared prefixes are reused before the LRU evicts them."""

from __future__ import annotations

from engine.kv_manager import KVManager
from engine.policies.base import AdmissionPolicy, preempted_first
from engine.sequence import Sequence


class LongestPrefixMatch(AdmissionPolicy):
    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        if len(waiting) < 2:
            return waiting
        # Stable sort: equal matches keep arrival order.
        return sorted(waiting, key=lambda s: (preempted_first(s), -kv.prefix_match_length(s)))
