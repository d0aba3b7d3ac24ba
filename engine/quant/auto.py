"""`quant=auto`, the default: keep what a GGUF file holds. Each layer takes the format that holds its tensor
type without loss (4-bit blocks stay int4), float tensors stay float, anything else becomes the last format
listed (grouped int8), as does a layer the chosen format cannot hold (int4 heads); a fused layer (QKV, gate+up)
whose parts differ (Q4_K_M mixes Q4_K and Q6_K) takes the most precise format of its parts. Off a single CPU
process (a GPU, tensor parallelism) the weights load as float."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine.quant.base import FLOAT_TYPES, NoQuant, QuantFormat, QuantScheme, load_format


class Auto(QuantScheme):
    name = "auto"

    def __init__(self, formats: list[str]) -> None:
        self.formats = [load_format(path) for path in formats]  # the last one takes every other type

    def for_placement(self, device_type: str, tp: int) -> QuantScheme:
        return self if device_type == "cpu" and tp == 1 else NoQuant()

    def format_for(self, tensor_type: str) -> QuantFormat | None:
        if tensor_type in FLOAT_TYPES:
            return None
        return next((f for f in self.formats if tensor_type in f.exact_types), self.formats[-1])

    def plan(self, parts: Mapping[str, Iterable[str]]) -> dict[str, str]:
        plan = {}
        for module, types in parts.items():
            formats = [self.format_for(t) for t in types]
            if formats and all(f is not None for f in formats):
                plan[module] = self.settle(module, max(formats, key=lambda f: f.rank), self.formats[-1])
        return plan
