"""Weight-quantized linear layers for the CPU, written as plain tensor code that inductor compiles.

Two formats, chosen per layer by the `quant=` scheme (engine/quant/):

- `Int8Linear`: int8 weights with one scale per output row. Several rows (prefill, batched decode) go
  through `torch._int_mm` (oneDNN's int8 GEMM) with the activations quantized per token to two int8
  digits (one where the layer's inputs allow it) on CPUs with VNNI, and through an fp32 GEMM against the
  weight converted to float elsewhere (`INT8_GEMM`); one row reads the int8 weight in a fused reduction
  with float activations. Measured with VNNI (SmolLM2, `experiments/cpu_vs_llamacpp.py`): prefill 1.5x and
  batch-32 decode 1.3x fp32's speed, batch 1 1.6x, with a perplexity 0.3% from fp32's.
- `Int4Linear`: 4-bit values in groups of 32 along the input, each group with its own scale and
  offset (w = scale * q + offset): the layout of GGUF's Q4_0, Q4_1 and Q4_K blocks, which therefore
  load without loss. The input stays in floating point, so outputs equal a matmul with the dequantized
  weights up to summation order. One row reads the packed nibbles directly (a fused reduction over
  tiles of 16 output rows); more than FEW_ROWS rows dequantize the weight inside the graph and run one GEMM.
  A bfloat16 model takes `PackedInt4Linear` instead where ATen's int4 kernel runs vectorised: the same values in
  that kernel's layout, which computes up to FEW_ROWS rows in one call.

Up to FEW_ROWS rows, both formats compute every row exactly as a lone row (`each_row`). The fused one-row
reductions are the compiled path; eager steps unpack the weight once and multiply (`RowPaths`).

Measured and rejected on an AVX-512 VNNI machine (1x576 @ 576x3072, fp32 0.16 ms; 32 rows 0.89 ms):
ATen's `_weight_int8pack_mm` (0.72 ms / 24 ms) and, with fp32 activations, `_weight_int4pack_mm_for_cpu` (1.5 ms /
48 ms) run far below fp32 (with bf16 ones the latter is fast: `PackedInt4Linear`); fbgemm's
`quantized.linear_dynamic` is as fast as `_int_mm` but quantizes activations per tensor and is deprecated.
oneDNN's prepacked `onednn.qlinear_pointwise` (uint8 activations; int8 ones took a reference path, 1.2 s per
call) beat `_int_mm` by 7% at 64 rows over 30 layers' weights, by 25% at 32: not worth a second weight format
there. On AVX2 it is 42x faster than `_int_mm` (SmolLM2's head at 64 rows: 27 vs 1134 ms; fp32 63 ms) but exact
only for uint8 activations below 128 (its 16-bit pair sums saturate), and it needs that second, prepacked copy of
the weight (docs/performance.md, 2026-12-04).
torchao's CPU int4 kernels are not in its PyPI wheel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.fusion import rounded, stored
from engine.kernels.row_invariant import in_calls, mm_in_calls

GROUP = 32  # values per int4 group: GGUF's block (and K-quant sub-block) width
# Output rows per int4 tile: one AVX-512 vector of fp32 (two of AVX2), so the one-row reduction reads each
# row's bytes contiguously (7.2 -> 5.1 ms for SmolLM2's layers; docs/performance.md, 2026-12-01).
TILE = 16
# Outputs per block of ATen's packed int4 layout (`PackedInt4Linear`), by the instruction set its CPU kernels were
# dispatched for: four vectors of fp32. Other builds pack neighbouring outputs into a byte instead.
PACK_BLOCKS = {"AVX512": 64, "AVX2": 32}
# oneDNN's int8 GEMM behind `torch._int_mm` is fast only with VNNI (AVX-512 VNNI, AVX-VNNI); on plain AVX2 it
# runs a reference loop 16-25x slower than an fp32 GEMM (SmolLM2's head at 64 rows: 1134 vs 70 ms). There an
# int8 layer's several-row steps multiply by its weight converted to float instead, in pieces of at most
# FLOAT_PIECE_BYTES: glibc maps larger blocks afresh on every allocation (its mmap threshold stops at 32 MB), and
# page-faulting SmolLM2's whole 113 MB float head in took 110 ms of a 32-row step. Pieces of 4 MB stay in cache
# between their conversion and their GEMM: SmolLM2's head at 32 rows, compiled, fp32 / bf16 (AVX-512 BF16 EPYC):
# 19.9 / 8.0 ms in pieces of ~4.5 MB, 29.1 / 32.2 in ~18 MB ones (docs/performance.md, 2026-12-07).
INT8_GEMM = torch.cpu._is_vnni_supported()
FLOAT_PIECE_BYTES = 4 << 20
# Steps of 2..FEW_ROWS rows (a speculative verification, a small decode batch) compute each row with the one-row
# product, so a row's values do not depend on what else the step holds (batch invariance: a greedy request's
# output is the same alone and batched, with and without speculation). Compiled, the rows are padded to the
# next of FEW_ROW_BUCKETS and unrolled, and inductor fuses the products into one pass over the weight (one
# graph per bucket). The products stay compute-bound on AVX2 (each row adds its own multiplies and adds to the
# shared load and conversion of every byte), so 8 rows cost ~4x one, but the dequantized GEMM and the float
# conversion of the int8 head cost more below 9 rows: SmolLM2 decode at batch 2/4/8, 35.6/56.2/93.5 ->
# 51.1/101.5/197.1 tok/s with every size padded to 8, 121/173/192 with buckets of 2, 4 and 8 (2026-12-05, `auto`).
# No bucket of 2: dynamic sizes start at 2, so `m <= 2` pins the size to the constant 2, and re-using a layer's
# compiled region (compile.regional) then fails inside dynamo (KeyError: 2 in stamp_out_subgraph, torch 2.13).
FEW_ROW_BUCKETS = (4, 8)
FEW_ROWS = FEW_ROW_BUCKETS[-1]


def rows_alone_are_faster(model: nn.Module) -> bool:
    """Whether `model`'s decode steps of more than FEW_ROWS rows are better run as steps of FEW_ROWS rows: on CPUs
    without a fast int8 GEMM (no VNNI) a quantized model's several-row step converts every weight to float, so
    four 8-row passes of the one-row kernels cost about what one 32-row GEMM step does and grow with the model
    more slowly (32 greedy sequences, 2026-12-05, same process: SmolLM2 `auto` 192 vs 203 tok/s, a random
    Qwen3-0.6B in Q4_K_M 47.6 vs 38.5), and each row's values are then those it has alone."""
    return not INT8_GEMM and any(isinstance(m, (Int4Linear, PackedInt4Linear, Int8Linear)) for m in model.modules())


def each_row(one_row: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`one_row` applied to every row of `x` (at most FEW_ROWS of them), stacked."""
    m = x.shape[0]
    if not torch.compiler.is_compiling():  # eager: exactly the rows there are
        if m == 0:  # a prefill chunk that samples nothing: an empty output of the right width
            return one_row(x.new_zeros(1, *x.shape[1:]))[:0]
        return torch.cat([one_row(x[i : i + 1]) for i in range(m)])
    rows = next(r for r in FEW_ROW_BUCKETS if m <= r)  # a guard: one graph per bucket
    padded = F.pad(x, (0, 0, 0, rows - m))
    return torch.cat([one_row(padded[i : i + 1]) for i in range(rows)])[:m]


def float_row(x: torch.Tensor) -> torch.Tensor:
    """A one-row product's input in fp32, stored once (`stored`), holding exactly x's values in x's dtype
    (`rounded`: compiled, a lone row's input could otherwise be its producer's unrounded fp32 result while a
    padded row of `each_row` read it rounded)."""
    return stored(rounded(x.float(), x.dtype))


def _out_row(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A one-row product's fp32 sums [N] as the row [1, N] in the model's dtype, rounded where its consumer
    would otherwise read them unrounded (see `float_row`)."""
    return rounded(y, dtype).unsqueeze(0).to(dtype)


def few_float_rows(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A float product of up to FEW_ROWS rows whose values for a row do not depend on how many rows there are.
    Compiled: one call of FEW_ROWS rows, padded (SmolLM2's layer shapes, frozen oneDNN GEMMs: 0.354 vs 0.328 ms
    for one row in fp32, 0.263 vs 0.255 in bf16). Eager: each row alone, as a GEMV (MKL's fp32 GEMM of 8 rows
    costs 3x its GEMV of one; 2026-12-06, AVX-512 machine)."""
    return in_calls(product, x, FEW_ROWS) if torch.compiler.is_compiling() else each_row(product, x)


def float_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int | None = None
) -> torch.Tensor:
    """F.linear with a float weight. Up to FEW_ROWS rows (a decode step, a speculative verification's rows) by
    `few_float_rows`: a GEMM's bits for a row depend on the call's row count, so a verification's 4 rows parted
    from the lone decode row (a float model's greedy answer with spec=ngram left spec=none's: SmolLM2's float
    weights in bf16, 2026-12-06), which speculation's token-identity needs. More rows: one GEMM, or calls of
    `rows` rows in batch-invariant mode (kernels/row_invariant.py)."""
    if x.shape[0] <= FEW_ROWS:
        return few_float_rows(lambda r: F.linear(r, weight, bias), x)
    if rows is None:
        return F.linear(x, weight, bias)
    out = mm_in_calls(x, weight.t(), rows)
    return out if bias is None else out + bias


class RowPaths:
    """A quantized layer's choice of path by row count: up to FEW_ROWS rows the one-row path (each row computed
    alone), more the several-row path (`_several_rows(x, gemm)`, its float products `gemm(a, b)` = a @ b, in calls
    of `invariant_rows` rows in batch-invariant mode: kernels/row_invariant.py).

    The one-row path is `_one_row` compiled, a reduction written for inductor to fuse with the weight's unpacking;
    run eagerly, every step of it materialised a float copy of the weight. Eager steps (`enforce_eager`, a
    server's steps while its graphs compile in the background) take `_eager_row` instead: the weight unpacked to
    float once and multiplied by a GEMM or GEMV (SmolLM2's default config, two threads, one process: 245-261 ->
    107-133 ms a token; docs/performance.md, 2026-12-07). Its values differ from the compiled ones by summation
    order only."""

    invariant_rows: int | None = None
    bias: torch.Tensor | None

    def _row(self, x: torch.Tensor) -> torch.Tensor:
        return self._one_row(x) if torch.compiler.is_compiling() else self._eager_row(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out = self._row(x)
        elif x.shape[0] <= FEW_ROWS:
            out = each_row(self._row, x)
        elif self.invariant_rows is None:
            out = self._several_rows(x, torch.mm)
        else:
            out = self._several_rows(x, functools.partial(mm_in_calls, rows=self.invariant_rows))
        return out if self.bias is None else out + self.bias


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (values [..., N, K] int8, scales [..., N] fp32) with w ~ values * scale."""
    w = w.float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127
    return torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine int4 per group of 32 (Q4_1's rule): (values [N, K] uint8 in 0..15, scales [N, K/32],
    offsets [N, K/32]) with w ~ scale * q + offset."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    scale = (high - low) / 15
    q = torch.round((g - low[..., None]) / torch.where(scale == 0, 1, scale)[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/32, 16] bytes: byte j of a group holds values j (low nibble) and
    j + 16 (high nibble), as in a GGUF block."""
    g = q.reshape(q.shape[0], -1, 2, GROUP // 2)
    return g[:, :, 0] | (g[:, :, 1] << 4)


class Int8Experts(nn.Module):
    """One projection of every expert of a MoE layer, stacked [experts, out, in], int8 with one scale per
    output row: the same interface as the float `ExpertWeights` (engine/models/transformer.py)."""

    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.empty(experts, out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(experts, out_features))

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return tuple(self.qweight.shape)

    def load_rows(self, rows: Any, w: torch.Tensor) -> None:
        self.qweight[rows], self.scale[rows] = quantize_int8_rows(w)

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, k or 1, in] against each token's experts [T, k] -> [T, k, out]. The int8 values are widened
        inside the reduction (inductor fuses the gather and the conversion into it): a token reads 1 byte per
        weight of its k experts, and the row scale multiplies the sum once."""
        return (x[:, :, None, :] * self.qweight[experts]).sum(-1) * self.scale[experts]

    def expert(self, e: int) -> torch.Tensor:
        """Expert `e`'s [out, in] weight in the model dtype (the eager path's per-expert GEMM)."""
        return self.qweight[e].to(self.scale.dtype) * self.scale[e, :, None]


class Int8Linear(RowPaths, nn.Module):
    """`digits`: int8 digits per activation in the several-row path (2: ~15 bits, 1: plain W8A8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, digits: int = 2) -> None:
        super().__init__()
        if digits not in (1, 2):
            raise ValueError(f"Int8Linear digits must be 1 or 2, got {digits}")
        self.in_features, self.out_features, self.digits = in_features, out_features, digits
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def load_rows(self, rows: slice, w: torch.Tensor) -> None:
        self.qweight[rows], self.scale[rows] = quantize_int8_rows(w)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in the scales' dtype."""
        return self.qweight.to(self.scale.dtype) * self.scale.unsqueeze(1)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        # One row (batch-1 decode): a reduction inductor fuses with the int8 -> float conversion, the
        # activations staying float; 82 tok/s for SmolLM2 here against 72 through `_int_mm` below.
        xf = float_row(x)
        return _out_row((xf * self.qweight.to(xf.dtype)).sum(-1) * self.scale, x.dtype)

    def _eager_row(self, x: torch.Tensor) -> torch.Tensor:
        return self._in_float_pieces(x, torch.mm)

    def _piece_rows(self, dtype: torch.dtype) -> int:
        """Output rows per piece of the weight converted to `dtype` (FLOAT_PIECE_BYTES)."""
        return max(1, FLOAT_PIECE_BYTES // (dtype.itemsize * self.in_features))

    def _in_float_pieces(self, x: torch.Tensor, gemm: Callable[..., torch.Tensor]) -> torch.Tensor:
        """x times the weight converted to float piece by piece (float activations)."""
        xf = x.float()
        pieces = [gemm(xf, w.to(xf.dtype).t()) for w in self.qweight.split(self._piece_rows(xf.dtype))]
        return (torch.cat(pieces, dim=-1) * self.scale).to(x.dtype)

    def _several_rows(self, x: torch.Tensor, gemm: Callable[..., torch.Tensor]) -> torch.Tensor:
        if not INT8_GEMM:
            return self._in_float_pieces(x, gemm)
        xf = x.float()
        # Each activation is written as two int8 digits per token (hi * step + lo * step / 254) and both
        # rows go through one `_int_mm`: the weight is read once, as with plain W8A8, at twice the
        # arithmetic. One digit (per-token W8A8) everywhere raised SmolLM2's perplexity by 3.8%, two by
        # 0.3%: ~15-bit activations leave only the weights' own rounding. Layers whose inputs carry no
        # outlier channels keep one digit (engine/quant/int8.py says which).
        step = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        hi = torch.round(xf / step)
        if self.digits == 1:
            y = torch._int_mm(hi.to(torch.int8), self.qweight.t()).float()
        else:
            lo = torch.round((xf - hi * step) * (254 / step))  # the remainder is within half a step
            y = torch._int_mm(torch.cat((hi, lo)).to(torch.int8), self.qweight.t()).float()
            y = y[: x.shape[0]] + y[x.shape[0] :] * (1 / 254)
        return (y * step * self.scale).to(x.dtype)


class Int8Embedding(nn.Module):
    """Rows of an int8 table (shared with an `Int8Linear` LM head when the embeddings are tied)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(num_embeddings))

    load_rows = Int8Linear.load_rows

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


def quantize_int8_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of 32 along the input (Q8_0's rule): (values [..., K] int8, scales [..., K/32])
    with w ~ values * scale."""
    g = w.float().unflatten(-1, (-1, GROUP))
    scale = g.abs().amax(-1) / 127
    q = torch.round(g / torch.where(scale == 0, 1, scale)[..., None]).clamp(-127, 127)
    return q.to(torch.int8).flatten(-2), scale


class GroupedInt8Linear(Int8Linear):
    """int8 weights with a scale per GROUP inputs of each row: GGUF's Q8_0 blocks as they are (no loss), 5- and
    6-bit blocks within the rounding of 8 bits per group. A scale per group does not factor out of a row's sum,
    so there is no integer GEMM: several rows multiply by the weight converted to float in pieces (what int8
    does without VNNI anyway); one row reads the int8 bytes in a fused reduction, as int8 does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        if in_features % GROUP:
            raise ValueError(f"GroupedInt8Linear needs in_features divisible by {GROUP}, got {in_features}")
        super().__init__(in_features, out_features, bias)
        self.register_buffer("scale", torch.empty(out_features, in_features // GROUP))

    def load_rows(self, rows: slice, w: torch.Tensor) -> None:
        self.load_groups(rows, *quantize_int8_groups(w))

    def load_groups(self, rows: slice, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Output rows `rows` from values [R, K] int8 and scales [R, K/32]."""
        self.qweight[rows], self.scale[rows] = q, scale.float()

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in the scales' dtype."""
        return _grouped_float(self.qweight, self.scale)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        # Each weight scaled inside the one reduction: SmolLM2's head as fast as int8's (44.4 vs 43.6 ms, both
        # compiled, a busy machine); a sum per group, then the scales, took 48.1.
        return _out_row((float_row(x) * _grouped_float(self.qweight, self.scale)).sum(-1), x.dtype)

    def _in_float_pieces(
        self, x: torch.Tensor, gemm: Callable[..., torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """x times the weight converted to `dtype` piece by piece: each piece's values computed in fp32 (the scales
        are bf16 in a bfloat16 model) and rounded once to `dtype`."""
        rows = self._piece_rows(dtype)
        pieces = zip(self.qweight.split(rows), self.scale.split(rows))
        xd = x.to(dtype)
        return torch.cat([gemm(xd, _grouped_float(q, s.float()).to(dtype).t()) for q, s in pieces], dim=-1).to(x.dtype)

    def _several_rows(self, x: torch.Tensor, gemm: Callable[..., torch.Tensor]) -> torch.Tensor:
        # In the model's dtype: a bfloat16 model's head of 32 rows (SmolLM2's 49,152 x 576 Q8_0 table, compiled,
        # an AVX-512 BF16 CPU) took 27.6 ms as fp32 pieces and 10.0 as bf16 ones, a third of the decode step.
        return self._in_float_pieces(x, gemm, x.dtype)


class GroupedInt8Embedding(Int8Embedding):
    """Rows of a grouped int8 table (shared with a `GroupedInt8Linear` LM head when the embeddings are tied)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.register_buffer("scale", torch.empty(num_embeddings, embedding_dim // GROUP))

    load_rows = GroupedInt8Linear.load_rows
    load_groups = GroupedInt8Linear.load_groups

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _grouped_float(self.qweight[ids], self.scale[ids])


class GroupedInt8Experts(Int8Experts):
    """Stacked experts [experts, out, in] in grouped int8 (a scale per 32 inputs of each row): a GGUF's Q8_0 and
    Q5_0 experts as they are. A token reads one byte per weight of its k experts, scaled inside the reduction."""

    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        if in_features % GROUP:
            raise ValueError(f"GroupedInt8Experts needs in_features divisible by {GROUP}, got {in_features}")
        super().__init__(experts, out_features, in_features)
        self.register_buffer("scale", torch.empty(experts, out_features, in_features // GROUP))

    load_rows = GroupedInt8Linear.load_rows
    load_groups = GroupedInt8Linear.load_groups

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return (x[:, :, None, :] * _grouped_float(self.qweight[experts], self.scale[experts])).sum(-1)

    def expert(self, e: int) -> torch.Tensor:
        return _grouped_float(self.qweight[e], self.scale[e])


def _nibbles(b: torch.Tensor, dim: int) -> torch.Tensor:
    """Bytes `b` as float values -> their low and high nibbles, stacked in a new dimension `dim` (low first)."""
    # Float arithmetic and a broadcast `where`: one pointwise pass that inductor vectorises (integer shifts it
    # vectorised poorly, and a `cat` of the halves ran eagerly: 32-row int4 decode 140 -> ~300 tok/s).
    b = b.unsqueeze(dim)
    hi = torch.floor(b * (1 / 16))
    half = torch.arange(2, device=b.device).view(2, *[1] * (b.dim() - dim - 1))
    return torch.where(half == 0, b - 16 * hi, hi)


def _grouped_float(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Values [..., K] int8 with scales [..., K/GROUP] -> [..., K] in the scales' dtype."""
    return (q.to(scale.dtype).unflatten(-1, (-1, GROUP)) * scale.unsqueeze(-1)).flatten(-2)


class Int4Linear(RowPaths, nn.Module):
    """Buffers in tiles of TILE neighbouring output rows, so that a one-row product reads each tile's
    bytes as one contiguous run: packed [T, G, 16, TILE] (`pack_int4`'s bytes), scale and offset
    [T, G, TILE]. out_features is padded up to whole tiles and the padding sliced off the output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        tiles, groups = -(-out_features // TILE), in_features // GROUP
        self.register_buffer("packed", torch.zeros(tiles, groups, GROUP // 2, TILE, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(tiles, groups, TILE))
        self.register_buffer("offset", torch.zeros(tiles, groups, TILE))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    weight_shape = Int8Linear.weight_shape

    def load_rows(self, rows: slice, w: torch.Tensor) -> None:
        self.load_groups(rows, *quantize_int4_groups(w))

    def load_groups(self, rows: slice, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Output rows `rows` from values [R, K] 0..15 with scales and offsets [R, K/32]."""
        r = torch.arange(self.out_features)[rows]
        tile, lane = r // TILE, r % TILE
        self.packed[tile, :, :, lane] = pack_int4(q)
        self.scale[tile, :, lane], self.offset[tile, :, lane] = scale.float(), offset.float()

    def groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `load_groups` took: values [N, K] uint8 0..15, scales and offsets [N, K/32] in fp32."""
        t, g = self.scale.shape[:2]
        q = torch.cat([self.packed & 15, self.packed >> 4], dim=2)  # [T, G, 32, TILE]
        by_row = lambda v: v.float().permute(0, 2, 1).reshape(t * TILE, g)[: self.out_features]  # noqa: E731
        return q.permute(0, 3, 1, 2).reshape(t * TILE, -1)[: self.out_features], by_row(self.scale), by_row(self.offset)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in the scales' dtype."""
        return self.dequantized_t().t()

    def dequantized_t(self) -> torch.Tensor:
        """The transposed weight [K, N]: written in the packed layout's order (output rows innermost), the
        8-bit loads stay contiguous; the [N, K] order gathered them (a 32-row step's down projection 1.23 ->
        0.53 ms on AVX2)."""
        q = _nibbles(self.packed.to(self.scale.dtype), 2).flatten(2, 3)  # [T, G, 32, TILE]
        w = q * self.scale.unsqueeze(2) + self.offset.unsqueeze(2)
        return w.permute(1, 2, 0, 3).reshape(self.in_features, -1)[:, : self.out_features]

    def _several_rows(self, x: torch.Tensor, gemm: Callable[..., torch.Tensor]) -> torch.Tensor:
        return gemm(x, self.dequantized_t())

    def _eager_row(self, x: torch.Tensor) -> torch.Tensor:
        # The nibbles split as bytes and converted to float once, [T, G, 32, TILE]; each group's dot products in
        # one batched product of the row's 32 values with the group's values for a tile's TILE outputs.
        q = torch.cat([self.packed & 15, self.packed >> 4], dim=2).to(torch.float32)
        xg = x.float().reshape(1, -1, 1, GROUP)  # [1, G, 1, 32]
        dots = torch.matmul(xg, q).squeeze(2)  # [T, G, TILE]
        out = (dots * self.scale + xg.sum(-1) * self.offset).sum(1)
        return out.reshape(-1)[: self.out_features].unsqueeze(0).to(x.dtype)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        # x . w = sum over groups of scale * (x_g . q_g) + offset * sum(x_g): the nibbles are read once.
        # A byte b holds lo + 16 * hi; with hi = floor(b / 16), x_lo * lo + x_hi * hi equals
        # x_lo * b + (x_hi - 16 x_lo) * hi: one conversion per byte and no integer shifts, which
        # inductor vectorises poorly (5.1 vs 7.0 ms for SmolLM2's int4 layers, out of cache).
        # In fp32 whatever the model's dtype: in bf16 the cancelling terms lose the low nibble (a bf16 model's
        # greedy tokens agreed with fp32 for 2 of 12 prompts instead of 9-11).
        xg = float_row(x).reshape(1, -1, 2, GROUP // 2, 1)  # [1, G, 2, 16, 1]
        x_lo, x_hi = xg[:, :, 0], xg[:, :, 1]
        b = self.packed.to(xg.dtype)  # [T, G, 16, TILE]
        dots = (x_lo * b + stored(x_hi - 16 * x_lo) * torch.floor(b * (1 / 16))).sum(2)  # [T, G, TILE]
        sums = xg.sum(dim=(2, 3))  # [1, G, 1]
        out = (dots * self.scale + sums * self.offset).sum(1)  # [T, TILE]
        return _out_row(out.reshape(-1)[: self.out_features], x.dtype)


class PackedInt4Linear(RowPaths, nn.Module):
    """`Int4Linear`'s values in ATen's packed layout for its int4 kernel (`_weight_int4pack_mm_for_cpu`), which a
    bfloat16 model takes instead on AVX-512 and AVX2 builds (`packs_int4`). That kernel dequantizes each group in
    registers and accumulates every row over the inputs in one fixed order, whatever the number of rows: up to
    FEW_ROWS rows it is the whole product (no padding to buckets; a row's values are those it has alone). SmolLM2's
    shapes, 8 rows, AVX-512 BF16 EPYC: 0.058 / 0.201 / 0.087 ms against 0.217 / 0.329 / 2.95 for `Int4Linear`'s
    unrolled one-row products; batch-8 decode 336-380 vs 182-257 tok/s, batch 1 alike (docs/performance.md,
    2026-12-07). More rows dequantize and multiply as `Int4Linear` does (the kernel's fp32 arithmetic took 2x a
    bf16 GEMM at 512 rows).

    Buffers: `packed` ATen's bytes ([N/B, K, B/2] for blocks of B outputs, `PACK_BLOCKS`: byte j of block b and
    input k holds output B b + j in its low nibble and B b + B/2 + j in its high one), `scale_zeros` [K/32, N, 2]
    bf16 with w = (q - 8) * scale + zero, and the group size as a tensor (inductor's lowering of the ATen op makes
    it a constant that a regional graph's subgraph passed as a non-scalar, torch 2.13; the quantized op takes the
    tensor as it is)."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.block = _pack_block()
        q, scale, offset = layer.groups()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # zero = offset + 8 scale computed in fp32 and rounded once (a symmetric group's is near scale / 2).
        sz = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(torch.bfloat16)  # [G, N, 2]
        self.register_buffer("scale_zeros", sz)
        self.register_buffer("group", torch.tensor(GROUP))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())

    weight_shape = Int8Linear.weight_shape

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in bfloat16."""
        return self.dequantized_t().t()

    def dequantized_t(self) -> torch.Tensor:
        """The transposed weight [K, N] in bfloat16, each value computed in fp32 and rounded once."""
        k, n = self.in_features, self.out_features
        b = self.packed.view(n // self.block, k, self.block // 2).float()  # [N/B, K, B/2]
        q = _nibbles(b, 2).permute(1, 0, 2, 3).reshape(k, n)  # output B b + B/2 h + j
        # Scales and zeros apart in fp32 first: read in place, each interleaved pair was gathered one value at a
        # time for every input (576 x 3072: 0.94 ms, as bits cast to fp32 1.69, from separate buffers 0.26).
        scale, zero = stored(self.scale_zeros[..., 0].float()), stored(self.scale_zeros[..., 1].float())  # [G, N]
        w = (q - 8).unflatten(0, (-1, GROUP)) * scale.unsqueeze(1) + zero.unsqueeze(1)
        return w.flatten(0, 1).to(torch.bfloat16)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.int4mm_packed_weight_cpu(x.contiguous(), self.packed, self.group, self.scale_zeros)

    def _several_rows(self, x: torch.Tensor, gemm: Callable[..., torch.Tensor]) -> torch.Tensor:
        return gemm(x, self.dequantized_t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FEW_ROWS:
            return super().forward(x)
        out = self._kernel(x)
        return out if self.bias is None else out + self.bias


def packs_int4(layer: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `layer` (an `Int4Linear`) runs as a `PackedInt4Linear` in a model of `dtype`: ATen's kernel is
    vectorised for bfloat16 activations only (fp32 takes a scalar loop: 24.8 ms for 32 x 576 x 1536 against 0.34),
    and the layout is known for whole blocks of outputs of AVX-512 and AVX2 builds."""
    block = _pack_block()
    return isinstance(layer, Int4Linear) and dtype == torch.bfloat16 and bool(block) and layer.out_features % block == 0


def _pack_block() -> int | None:
    """Outputs per block of ATen's packed int4 layout on this CPU's kernels (`PACK_BLOCKS`), None if unknown."""
    return PACK_BLOCKS.get(torch.backends.cpu.get_cpu_capability())
