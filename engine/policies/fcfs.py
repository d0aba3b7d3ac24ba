"""First come, first served: admission in arrival order."""

from __future__ import annotations

from engine.kv_manager import KVManager
from engine.policies.base import AdmissionPolicy
from engine.sequence import Sequence


class FCFS(AdmissionPolicy):
    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        return waiting
