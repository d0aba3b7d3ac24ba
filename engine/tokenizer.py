"""Tokenizers and chat templates through transformers; incremental detokenization and stop strings."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from engine.models.source import ModelSource, gguf_cache_dir
from engine.progress import progress
from engine.tool_calls import messages_as_text, template_knows_tools

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def load_tokenizer(src: ModelSource) -> PreTrainedTokenizerBase:
    # Imported here: transformers costs seconds, and the engine process loads a tokenizer only for its first
    # constrained request (engine/structured.py).
    from transformers import AutoTokenizer

    if not src.is_gguf:
        return AutoTokenizer.from_pretrained(str(src.path))
    # Converting a GGUF vocabulary takes seconds; keep the converted tokenizer next to the inductor cache.
    cached = gguf_cache_dir(src.path, "tokenizers")
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    with progress(log, f"converting the tokenizer of {src.path.name} for transformers (once per file)"):
        tok = AutoTokenizer.from_pretrained(str(src.directory), gguf_file=src.path.name)
        if tok.chat_template is None:
            tok.chat_template = _family_template(src)
    with contextlib.suppress(OSError):  # read-only home: convert again next time
        tok.save_pretrained(str(cached))
    return tok


# Gemma 3's chat format (Google's template for the instruction-tuned models): turns of user and "model",
# a system message folded into the first user turn. Its GGUFs do not always carry it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _family_template(src: ModelSource) -> str | None:
    from engine.models.loader import load_config

    return GEMMA3_CHAT_TEMPLATE if load_config(src).architecture == "gemma3_text" else None


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The conversation (and the tools the model may call) through the model's chat template."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("invalid messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"invalid messages[{i}]: expected a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"invalid messages[{i}].role={m['role']!r}")
    if tokenizer.chat_template is None:
        raise ValueError("this model's tokenizer has no chat template; use generate() with a raw prompt")
    kwargs = dict(chat_template_kwargs or {})
    has_tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if template_knows_tools(tokenizer.chat_template):
        if tools:
            kwargs["tools"] = tools
    elif tools or has_tool_turns:
        messages = messages_as_text(messages, tools)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    # The template already wrote any BOS it wants.
    return tokenizer.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Text deltas for a growing token list.

    Decodes a short window (from the last emitted boundary) instead of the whole list each step, and
    holds back a delta that ends in U+FFFD: that is half a UTF-8 character whose other bytes are still
    to come. `finish` emits whatever the full decode has beyond what was emitted, so the concatenated
    deltas equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: decoding from here gives a stable text prefix
        self._read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        full = self._decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta


class TextState:
    """The visible text of one completion: detokenized, cut at the first stop string, and for streaming
    held back while its tail could still turn into a stop string."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str],
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def update(self, new_ids: list[int], finished: bool) -> str:
        """Feed new tokens; returns the newly visible text. Sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        searched_to = max(0, len(self.text) - self._holdback)
        self.text += self.detok.add(new_ids)
        if finished:
            self.text += self.detok.finish()
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, searched_to)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + len(s) if self.include_stop else i]
            self.stopped = True
        end = len(self.text) if finished or self.stopped else max(self.emitted, len(self.text) - self._holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
