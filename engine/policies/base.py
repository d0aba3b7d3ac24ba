"""What a scheduling policy decides: the order in which waiting sequences are admitted.

Everything else about a step (the token budget, chunked prefill, preemption of the newest running
sequence when pages run out) is the same under every policy and lives in `engine/scheduler.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from engine.kv_manager import KVManager
from engine.sequence import Sequence


class AdmissionPolicy(ABC):
    @abstractmethod
    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        """`waiting` (arrival order, preempted sequences in front) in the order to admit them.

        The scheduler admits from the front until one does not fit, so a policy that moves a sequence
        ahead also makes the ones behind it wait for it.
        """


def preempted_first(seq: Sequence) -> bool:
    """Sort key part: a preempted sequence already held pages and made progress; it goes back in first."""
    return seq.num_preemptions == 0
