"""What a weight format is (`QuantFormat`: the layers it can hold, the module it builds, how that module loads
a checkpoint tensor) and what a `quant=` choice is (`QuantScheme`: which layer gets which format). A new
format is one file with a QuantFormat subclass and one YAML naming it (a `Uniform` scheme over it)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

HEADS = ("embed_tokens", "lm_head")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
FORMATS: dict[str, QuantFormat] = {}  # name -> format, filled as format modules are imported
# Float values converted at a time while loading: a whole tensor read at once (and its quantization's temporaries)
# was most of a load's peak memory (SmolLM2's 49152 x 576 embedding: 113 MB of fp32, ~3x that at the peak). The
# first load of SmolLM2 peaked at 2.2x its weights and KV pool in pieces of 16 MB, 1.73x of 4 MB, 1.55x of 1 MB.
LOAD_BYTES = 1 << 20


class QuantFormat(ABC):
    name: ClassVar[str]  # in plans, cache folder names and logs
    rank: ClassVar[int]  # precision order: a fused layer whose parts differ takes the most precise format
    exact_types: ClassVar[tuple[str, ...]] = ()  # GGUF types it holds without loss (`auto` keeps them in it)
    module_types: ClassVar[tuple[type[nn.Module], ...]]  # what `build` makes (the loader recognises these)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            FORMATS[cls.name] = cls()

    def holds(self, module: str) -> bool:
        """Whether this format may hold `module` (a layer's name in the model)."""
        return True

    @abstractmethod
    def build(self, float_module: nn.Module, module: str) -> nn.Module:
        """The module to hold `float_module`'s weights in this format (made on the meta device)."""

    def load(self, target: nn.Module, rows: Any, read: Any, part: tuple[slice, ...], checked: Callable) -> None:
        """Fill `rows` of `target`'s weight from a checkpoint tensor (`read(part)` gives its float values;
        `checked` validates a tensor's shape against those rows), LOAD_BYTES of float values at a time."""
        if not isinstance(rows, slice):  # (experts, rows) of stacked experts, read at once
            self.load_part(target, rows, read, part, checked)
            return
        shape = checked(torch.empty(read.shape, device="meta")[part]).shape
        into = range(target.weight_shape[0])[rows]
        source = range(read.shape[0])[part[0]]
        block = getattr(read, "row_block", 1)  # whole heads of a GGUF's permuted Q/K rows
        step = max(1, LOAD_BYTES // (4 * max(1, shape[1:].numel()) * block)) * block
        for i in range(0, len(source), step):
            piece = (_as_slice(source[i : i + step]), *part[1:])
            self.load_part(target, _as_slice(into[i : i + step]), read, piece, lambda t: t)  # shape checked above

    def load_part(self, target: nn.Module, rows: Any, read: Any, part: tuple[slice, ...], checked: Callable) -> None:
        """Fill `rows` from `part` of the checkpoint tensor; a format that takes a file's blocks as they are reads
        them here instead of the float values."""
        target.load_rows(rows, checked(read(part)))


def _as_slice(r: range) -> slice:
    return slice(r.start, r.stop, r.step)


def format_of(module: nn.Module) -> QuantFormat | None:
    return next((f for f in FORMATS.values() if type(module) in f.module_types), None)  # grouped int8 subclasses int8


def load_format(path: str) -> QuantFormat:
    """The format a dotted class path names (importing its module registers it)."""
    module, _, name = path.rpartition(".")
    return FORMATS[getattr(importlib.import_module(module), name).name]


class QuantScheme(ABC):
    """A `quant=` choice: `plan` says which layers get which format from the checkpoint's tensor types."""

    name: str  # in cache folder names and logs

    def for_placement(self, device_type: str, tp: int) -> QuantScheme:
        """The scheme to use on this device and under this tensor parallelism (config refuses the impossible)."""
        return self

    @abstractmethod
    def plan(self, parts: Mapping[str, Iterable[str]]) -> dict[str, str]:
        """{module: format name} for the layers to quantize, from each layer's checkpoint tensor types (a
        fused layer has several); layers left out stay in the model dtype."""

    @staticmethod
    def settle(module: str, *formats: QuantFormat) -> str:
        """The first of `formats` that can hold `module`, else int8 (which holds every layer)."""
        return next((f.name for f in formats if f.holds(module)), "int8")


class NoQuant(QuantScheme):
    """Every weight in the model dtype (a GGUF is dequantized once into the engine cache)."""

    name = "none"

    def plan(self, parts: Mapping[str, Iterable[str]]) -> dict[str, str]:
        return {}


class Uniform(QuantScheme):
    """Every layer in one format (or int8 where it cannot hold a layer)."""

    def __init__(self, format: str) -> None:
        self.format = load_format(format)
        self.name = self.format.name

    def plan(self, parts: Mapping[str, Iterable[str]]) -> dict[str, str]:
        return {module: self.settle(module, self.format) for module in parts}


def quantize_modules(model: nn.Module, plan: Mapping[str, str]) -> None:
    """Swap the planned modules for their quantized forms (on the meta device, before loading)."""
    for name, fmt in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, FORMATS[fmt].build(getattr(parent, attr), attr))


def weight_bytes(model: nn.Module, skip: str | None = None) -> int:
    """Bytes of `model`'s weights, a tensor shared by several modules (a tied table) once; with `skip`, the tensors
    whose names start with it left out (a shared one still counts under its other name)."""
    items = model.state_dict().items()
    tensors = {t.data_ptr(): t for n, t in items if skip is None or not n.startswith(skip)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def float_format(tensor_type: str) -> bool:
    return tensor_type in FLOAT_TYPES
