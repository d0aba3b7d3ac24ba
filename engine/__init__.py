"""A pure-PyTorch LLM inference engine: `from engine import LLM, SamplingParams`.

The names are imported on first use, so a process that needs only part of the package (the HTTP
frontend, before it has spawned the engine) does not pay for importing torch and transformers."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any


def _map_source_kernels() -> None:
    """Make the repository's top-level kernels/ folder importable as `engine.kernels`.

    The top-level name `kernels` is Hugging Face's package, which transformers imports, so the folder has no
    __init__.py and is never importable as `kernels` (issue #33). An installed wheel holds it as
    engine/kernels/ (pyproject's package-dir); a source checkout, editable install or not, is mapped here,
    since setuptools' editable finder does not resolve a mapped folder without an __init__.py."""
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not source.is_dir() or f"{__name__}.kernels" in sys.modules:
        return
    spec = ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Attention, sampling and quantized-matmul kernels in plain PyTorch, meant for torch.compile."
    sys.modules[spec.name] = module
    globals()["kernels"] = module  # as the import system would set a loaded subpackage on its parent


_map_source_kernels()

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
