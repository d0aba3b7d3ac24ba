"""Constrained decoding (JSON schema, regex, Lark grammar) through llguidance.

A request's constraint becomes an llguidance grammar; each constrained sequence holds a matcher that
follows its output. Every step, before sampling, the matcher fills a bitmask of the tokens allowed next
and the sampler's logits for that row are masked with it; after sampling the matcher consumes the token,
and once the grammar is complete (the JSON value closed) the sequence stops with "stop". End-of-sequence is
only allowed where the grammar accepts. Masking happens on the logits after the (compiled or eager) model
step, so constrained and free rows share every batch, and a preempted sequence keeps its matcher: its
tokens are recomputed, never re-sampled.

llguidance rather than xgrammar (both measured by `experiments/grammar_backends.py` on SmolLM2's tokenizer,
22 schemas): llguidance builds a matcher in 0.7 ms where xgrammar compiles a schema in 5 ms, and it has no
dependencies (xgrammar needs torch, triton and tvm-ffi); xgrammar fills masks faster (32 rows: 0.035 vs
0.11 ms median, 0.39 vs 17 ms p99, llguidance's tail being a request's first masks). Against 40-200 ms
decode steps here both medians vanish: half of a batch of 32 constrained cost +2.1% step time
(`experiments/structured_overhead.py`).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from engine.models.source import ModelSource

log = logging.getLogger(__name__)
# Compact JSON with fixed separators. With flexible whitespace a small model at temperature 1 filled its
# whole token budget with newlines and tabs inside the first object (measured: 60 of 60 tokens on a tiny
# random model), so the output never closed; JSON's meaning does not depend on it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Constrained(Protocol):
    """What a constraint is read from (SamplingParams; not imported here, which imports this module)."""

    json_schema: dict | str | None
    regex: str | None
    grammar: str | None


def grammar_of(params: Constrained) -> str | None:
    """The llguidance grammar for the request's constraint, or None when it has none."""
    import llguidance

    if params.json_schema is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(params.json_schema, defaults=JSON_LAYOUT)
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)
    return None


@functools.lru_cache(maxsize=256)
def grammar_error(grammar: str) -> str | None:
    """Why llguidance rejects `grammar` (an invalid schema, regex or Lark text), or None; cached by text."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar)
    return error or None


class GrammarBackend:
    """The model's tokenizer as llguidance sees it, and the matchers built from it.

    Wrapping a tokenizer takes ~0.5 s, so it is built once, on a thread, when the first constrained request
    arrives; until `ready` is set those requests wait outside the scheduler while others keep stepping.
    """

    def __init__(self, source: ModelSource, vocab_size: int) -> None:
        self.source = source
        self.vocab_size = vocab_size
        self.ready = threading.Event()
        self.failed: str | None = None
        self._tokenizer: Any = None
        self._started = False
        self._built: dict[str, Any] = {}  # grammar -> an unused matcher for it (LRU)

    def start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._build, name="grammar-tokenizer", daemon=True).start()

    def _build(self) -> None:
        try:
            import llguidance.hf

            from engine.tokenizer import load_tokenizer

            self._tokenizer = llguidance.hf.from_tokenizer(load_tokenizer(self.source), n_vocab=self.vocab_size)
        except Exception as e:  # reported on every constrained request instead of a dead engine
            log.exception("building the grammar tokenizer failed")
            self.failed = f"constrained decoding is unavailable: {type(e).__name__}: {e}"
        self.ready.set()

    def matcher(self, params: Constrained) -> Any:
        """A fresh matcher for the request's constraint: a copy of the one built for the same grammar before
        (building takes 0.4-0.7 ms for the test schemas here, a copy ~0.01 ms)."""
        import llguidance

        grammar = grammar_of(params)
        pristine = self._built.pop(grammar, None)
        if pristine is None:
            pristine = llguidance.LLMatcher(self._tokenizer, grammar)
            if pristine.is_error():
                raise ValueError(f"invalid constraint: {pristine.get_error()}")
        self._built[grammar] = pristine  # most recently used last
        if len(self._built) > 256:
            del self._built[next(iter(self._built))]
        return pristine.deep_copy()

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Set the logits of every token a row's matcher does not allow next to -inf (in place)."""
        import llguidance.torch as lt
        import torch

        bitmask = lt.allocate_token_bitmask(len(rows), self.vocab_size)
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, bitmask, i)
        banned = ~unpack_bitmask(bitmask, logits.shape[-1]).to(logits.device)
        with torch.inference_mode():  # the step's logits are inference tensors
            for i, row in enumerate(rows):  # in place, row by row: no gather/scatter copy of the batch's logits
                logits[row].masked_fill_(banned[i], float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 words (bit j of word w: token 32*w + j) -> [B, width] bool; tokens past the
    bitmask (vocabulary padding) are never allowed. llguidance's own apply function torch.compiles a kernel
    per batch size (~100 ms each, measured); numpy's unpackbits over the little-endian bytes is one pass."""
    import numpy as np
    import torch

    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits[:, :width]).bool()
    if allowed.shape[1] < width:
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]))
    return allowed
