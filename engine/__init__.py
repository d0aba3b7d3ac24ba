"""A pure-PyTorch LLM inference engine: `from engine import LLM, SamplingParams`.

The names are imported on first use, so a process that needs only part of the package (the HTTP
frontend, before it has spawned the engine) does not pay for importing torch and transformers."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "Usage": "engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
