"""A GGUF file's metadata and tensor index, read straight from the memory-mapped file. Each tensor's `data` is a
view of the mapping (its shape, dtype and offsets); the engine's loader reads the bytes from the file instead
(engine/models/loader.py `GGUFTensor._converted`), so that the mapped pages never count as its memory.

gguf's own `GGUFReader` keeps a numpy view of every metadata item, one per vocabulary entry: 167 MB of resident
memory for SmolLM2's 98 MB file as long as the reader lives, more than its quantized weights (108 MB). Here the
values are plain Python ones (a few MB of strings for the vocabulary); the gguf library still gives the types,
their block sizes and the dequantization.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
# Element types of the tensors that hold plain numbers; every other type is blocks of bytes.
PLAIN = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
VERSIONS = (2, 3)  # 64-bit counts; version 1 (2023) had 32-bit ones


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    data_offset: int  # in the file
    n_bytes: int
    data: np.ndarray  # mapped, in numpy's order; block types as bytes, one row of blocks per last index


class GGUFIndex:
    """`fields`: metadata key -> value (arrays as lists); `tensors`: in the file's order."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.fields: dict[str, Any] = {}
        self.tensors: list[GGUFTensorInfo] = []
        try:
            self._parse()
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from None

    def _parse(self) -> None:
        magic, version = struct.unpack_from("<II", self.mapping, 0)
        if magic != GGUF_MAGIC:
            raise ValueError("no GGUF magic number at its start")
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} (readable: {', '.join(map(str, VERSIONS))}, little-endian)")
        n_tensors, n_fields = struct.unpack_from("<QQ", self.mapping, 8)
        offset = 24
        for _ in range(n_fields):
            key, offset = self._string(offset)
            (kind,) = struct.unpack_from("<I", self.mapping, offset)
            self.fields[key], offset = self._value(GGUFValueType(kind), offset + 4)
        entries = []
        for _ in range(n_tensors):
            name, offset = self._string(offset)
            (dims,) = struct.unpack_from("<I", self.mapping, offset)
            shape = struct.unpack_from(f"<{dims}Q", self.mapping, offset + 4)
            kind, start = struct.unpack_from("<IQ", self.mapping, offset + 4 + 8 * dims)
            entries.append((name, GGMLQuantizationType(kind), shape, start))
            offset += 4 + 8 * dims + 12
        align = self.fields.get("general.alignment", 32)
        data_start = -(-offset // align) * align
        self.tensors = [self._tensor(*entry, data_start) for entry in entries]

    def _string(self, offset: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.mapping, offset)
        return self.mapping[offset + 8 : offset + 8 + n].decode("utf-8", errors="replace"), offset + 8 + n

    def _value(self, kind: GGUFValueType, offset: int) -> tuple[Any, int]:
        if kind == GGUFValueType.STRING:
            return self._string(offset)
        if kind in SCALARS:
            fmt = "<" + SCALARS[kind]
            return struct.unpack_from(fmt, self.mapping, offset)[0], offset + struct.calcsize(fmt)
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        item, count = struct.unpack_from("<IQ", self.mapping, offset)
        offset += 12
        item = GGUFValueType(item)
        if item in SCALARS:  # one unpack for the whole array (token scores, types)
            fmt = f"<{count}{SCALARS[item]}"
            return list(struct.unpack_from(fmt, self.mapping, offset)), offset + struct.calcsize(fmt)
        values = []
        for _ in range(count):
            value, offset = self._value(item, offset)
            values.append(value)
        return values, offset

    def _tensor(
        self, name: str, kind: GGMLQuantizationType, shape: tuple[int, ...], start: int, data_start: int
    ) -> GGUFTensorInfo:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        elements = int(np.prod(shape))
        n_bytes = elements * block_bytes // block
        offset = data_start + start
        if offset + n_bytes > len(self.mapping):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        dims = tuple(reversed(shape))
        if kind in PLAIN:
            data = np.frombuffer(self.mapping, PLAIN[kind], elements, offset).reshape(dims)
        else:
            data = np.frombuffer(self.mapping, np.uint8, n_bytes, offset).reshape(quant_shape_to_byte_shape(dims, kind))
        return GGUFTensorInfo(name, kind, tuple(int(n) for n in shape), offset, n_bytes, data)
