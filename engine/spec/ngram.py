"""Prompt lookup (n-gram) proposals: the tokens that followed the latest earlier occurrence of the sequence's
last n tokens, in its prompt or its output so far (vLLM's `ngram`, llama.cpp's prompt lookup decoding).

Free to compute and strong where the answer copies its input: code edits, quoting, extraction, summaries
that reuse phrases. The index per sequence maps every n-gram to where it last ended and is extended by the
tokens added since the previous step, so a proposal costs O(new tokens), not a scan of the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import Sequence
from engine.spec.base import Proposer


@dataclass
class NgramIndex:
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> latest position it ended at
    indexed: int = 0  # n-grams ending before this position are in `last_end`


class NgramProposer(Proposer):
    def __init__(self, num_tokens: int = 4, min_ngram: int = 2, max_ngram: int = 4, **kwargs) -> None:
        super().__init__(num_tokens, **kwargs)  # the values were checked with the config (engine/config.py)
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # longest match first: it predicts best

    def describe(self) -> str:
        return f"ngram (prompt lookup, n-grams {self.sizes[-1]}..{self.sizes[0]}), {super().describe()}"

    def _index(self, seq: Sequence) -> NgramIndex:
        state = self.state(seq)
        if state.extra is None:
            state.extra = NgramIndex()
        index, tokens = state.extra, seq.token_ids
        # Every n-gram ending before the last token: the last one is what is looked up, and may only match
        # an earlier occurrence.
        for end in range(index.indexed, len(tokens) - 1):
            for n in self.sizes:
                if end + 1 >= n:
                    index.last_end[tuple(tokens[end + 1 - n : end + 1])] = end
        index.indexed = max(index.indexed, len(tokens) - 1)
        return index

    def _propose(self, seq: Sequence, n: int) -> list[int]:
        if n == 0:
            return []
        index, tokens = self._index(seq), seq.token_ids
        for size in self.sizes:
            if size > len(tokens):
                continue
            end = index.last_end.get(tuple(tokens[len(tokens) - size :]))
            if end is not None:
                return tokens[end + 1 : end + 1 + n]
        return []
