"""Priority scheduling (vLLM's `priority`): lower `SamplingParams.priority` values are admitted first,
equal priorities in arrival order. Running sequences are not preempted for a higher-priority arrival;
the policy decides only who gets the next free slot."""

from __future__ import annotations

from engine.kv_manager import KVManager
from engine.policies.base import AdmissionPolicy, preempted_first
from engine.sequence import Sequence


class Priority(AdmissionPolicy):
    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        return sorted(waiting, key=lambda s: (preempted_first(s), s.params.priority, s.arrival))
