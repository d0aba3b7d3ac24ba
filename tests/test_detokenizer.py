"""Incremental detokenization on multi-byte text, and stop strings (cut, hold-back while streaming)."""

from __future__ import annotations

import pytest

from engine.tokenizer import IncrementalDetokenizer, TextState

TEXTS = [
    "日本の首都は東京です。🍣🍜 and emoji 👩‍👩‍👧‍👦 family",
    "Ünïcödé — “quotes” and ∑ maths ≠ ascii; 한국어 텍스트; עברית",
    "plain ascii with  double  spaces\nand\ttabs",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_emits_half_characters(qwen_tokenizer, text):
    ids = qwen_tokenizer.encode(text)
    detok = IncrementalDetokenizer(qwen_tokenizer)
    pieces = [detok.add([t]) for t in ids]
    pieces.append(detok.finish())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == qwen_tokenizer.decode(ids) == text
    # Some emoji span several tokens: at least one step must have held text back.
    if "🍣" in text:
        assert "" in pieces[:-1]


def test_stop_string_is_cut_and_streaming_holds_back(qwen_tokenizer):
    ids = qwen_tokenizer.encode("The answer is 42. END of story")
    state = TextState(qwen_tokenizer, stop=["END"])
    deltas = []
    for t in ids:
        deltas.append(state.update([t], finished=False))
        assert "E" not in "".join(deltas)  # never streamed a prefix of the stop string
        if state.stopped:
            break
    assert state.stopped
    assert "".join(deltas) == state.text == "The answer is 42. "


def test_stop_string_included_when_asked(qwen_tokenizer):
    state = TextState(qwen_tokenizer, stop=["42", "never"], include_stop=True)
    for t in qwen_tokenizer.encode("The answer is 42. END"):
        state.update([t], finished=False)
    assert state.stopped and state.text == "The answer is 42"


def test_held_back_text_is_released_at_the_end(qwen_tokenizer):
    state = TextState(qwen_tokenizer, stop=["STOP"])
    ids = qwen_tokenizer.encode("almost ST")
    out = "".join(state.update([t], finished=i == len(ids) - 1) for i, t in enumerate(ids))
    assert out == "almost ST" and not state.stopped
