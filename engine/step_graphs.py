"""Compilation of the runner's two step graphs, in one place: options per device, when they compile
(lazily, or on a background thread while steps run eagerly), and the warm-up that builds them.

The decode graph traces a whole decode-only step, attention included (`PagedAttentionBase.decode`);
on CUDA `mode=auto` records it as CUDA graphs. The prefill graph traces steps carrying prefill chunks,
attention being one opaque eager op per layer (kernels/paged.py). `decode`/`prefill` stay None until a
graph is usable; the runner runs eagerly until then.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine import inductor_fixes
from engine.config import CompileConfig
from engine.kernels.paged import (
    DecodeStep,
    PagedAttentionBase,
    PagedBatch,
    opaque_attention_step,
)
from engine.kernels.quant_linear import FEW_ROW_BUCKETS, FEW_ROWS
from engine.kv_cache import SCRATCH_PAGE, cache_tensors
from engine.models.transformer import CausalLM, run_layer
from engine.progress import Progress

log = logging.getLogger(__name__)
DECODE_LABEL = "decode graph (batch {})"
# Tracing (make_fx, fx.symbolic_trace) patches torch.nn.Module.__call__ for the whole process while it runs:
# an eager step calling a module on another thread inside that window is traced into the wrong graph and
# fails ("module is not installed as a submodule"; the engine died this way in a 200-client soak while the
# graphs compiled in the background). During a background warm-up, tracing holds this lock and eager
# steps run under it; each waits at most for one trace or one step.
_TRACING = threading.RLock()
_calling = threading.local()  # which graph this thread is calling, for the compile log lines below
_compilations = 0  # graphs dynamo has started compiling in this process (`compilations`)


def compilations() -> int:
    """How many graphs dynamo has started compiling in this process so far: a step during which this changed
    (or a background warm-up ran) timed a compilation, not the step (engine/spec/governor.py)."""
    return _compilations


def _compile_started(args: Any) -> None:
    global _compilations
    _compilations += 1
    name = getattr(_calling, "name", None)
    if name is not None:
        _calling.progress = Progress(log, f"compiling the {name}")


def _compile_ended(args: Any) -> None:
    if getattr(_calling, "name", None) is not None:
        _calling.progress.finish()


@functools.cache
def _announce_compilations() -> None:
    """Register the callbacks above with dynamo, once, when a first graph is set up: importing dynamo costs
    1.4 s, which an eager engine need not pay before its first line."""
    from torch._dynamo.callback import on_compile_end, on_compile_start

    on_compile_start(_compile_started)
    on_compile_end(_compile_ended)


def _named(fn: Callable[..., torch.Tensor], label: str, frozen: bool) -> Callable[..., torch.Tensor]:
    """`fn`, announcing itself by `label` (formatted with the step's token count) to the compile log lines:
    one per compilation, instead of inductor's own output; and compiling with inductor's `freezing` as this
    runner chose it. Inductor reads that flag from its global config when a graph compiles, which is inside a
    call (torch.compile is lazy), so a second runner in the process (a quantized draft model, which turns it
    off) changed it under the first: a bf16 target's 4-row verification beside an int4 draft compiled without
    frozen, prepacked GEMMs and took 20 ms instead of 12 (2026-12-06)."""

    def call(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        _calling.name = label.format(input_ids.shape[0])
        try:
            if torch._inductor.config.freezing == frozen:
                return fn(input_ids, *args)
            with torch._inductor.config.patch(freezing=frozen):
                return fn(input_ids, *args)
        finally:
            _calling.name = None

    return call


# (input_ids, positions, meta) -> logits of every token / (input_ids, positions, rows) -> logits of rows
DecodeFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
PrefillFn = Callable[..., torch.Tensor]


class StepGraphs:
    def __init__(
        self,
        model: CausalLM,
        decode_fn: DecodeFn,
        prefill_fn: PrefillFn,
        backend: PagedAttentionBase,
        cfg: CompileConfig,
        device: torch.device,
        prefill_tokens: int,
        decode_step_rows: int | None = None,
        prefill_logit_rows: int = 2,
    ) -> None:
        self.model = model
        self.decode_step_rows = decode_step_rows  # the most rows a decode step has (larger ones are split)
        self.prefill_logit_rows = prefill_logit_rows  # the fewest logit rows a compiled prefill step has
        self.backend = backend
        # False when every linear layer is quantized
        self.float_gemms = any(isinstance(m, torch.nn.Linear) for m in model.modules())
        self.cfg = cfg
        self.device = device
        self.regional = self._regional()
        self.prefill_tokens = prefill_tokens  # a full chunk: the shape the prefill graph is tuned for
        self.decode: DecodeFn | None = None
        self.prefill: PrefillFn | None = None
        self.ready = threading.Event()  # set once both are assigned
        self.warming_up = False  # a background thread is compiling while steps run eagerly
        if not cfg.enabled:
            return
        # Under tensor parallelism every rank must compile in the same step (the graphs hold
        # collectives), so ranks compile when rank 0's first compiled plan arrives. On CUDA, compiling
        # and capturing graphs on one thread while another runs eager steps segfaulted (H200, torch
        # 2.11), so there too the graphs are built by the first decode steps.
        if cfg.warmup == "background" and model.tp.size == 1 and device.type != "cuda":
            _serialise_tracing()
            self.warming_up = True
            threading.Thread(
                target=self.warm_up, args=(decode_fn, prefill_fn), name="compile-warmup", daemon=True
            ).start()
        else:
            self.decode, self.prefill = self._compile(decode_fn, prefill_fn)
            self.ready.set()

    def _regional(self) -> bool:
        """Whether to compile one layer's code for all layers: by default on CPU when the weights are not
        frozen (freezing makes them constants of the graph, which a shared layer cannot take as arguments),
        never with collectives inside the layer (tensor parallelism)."""
        # Not on CUDA either: the decode graphs' inputs are views of one static buffer, and a nested compiled
        # region refuses aliased inputs.
        if self.model.tp.size > 1 or self.device.type == "cuda":
            return False
        if self.cfg.regional is not None:
            return self.cfg.regional
        frozen = self.cfg.mode == "auto" and self.float_gemms and bool(self.cfg.cpu.get("freezing"))
        return self.device.type != "cuda" and not frozen

    def _compile(self, decode_fn: DecodeFn, prefill_fn: PrefillFn) -> tuple[DecodeFn, PrefillFn | None]:
        """The decode graph and the prefill graph (None when compile.prefill is off). torch.compile is lazy:
        each compiles on its first call."""
        # Bucketed batch sizes and the growing context length would each cost a recompile under static
        # shapes; dynamic shapes serve them with one graph (plus size-1 specialisations). Backends that
        # cannot be traced symbolically get one static graph per (bucket, width).
        _announce_compilations()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # The KV pool never changes shape. Left symbolic, "duck sizing" gave a batch of 2 (or 16) the symbol
        # of the KV head count (or page size), which the cache write then pinned: the "dynamic" graph only
        # served that one batch size and the next size compiled for minutes in the middle of a run.
        for cache in (*cache_tensors(self.backend.k_cache), *cache_tensors(self.backend.v_cache)):
            torch._dynamo.mark_static(cache)
        torch.fx.experimental._config.use_duck_shape = False  # equal sizes of different inputs stay apart
        # Left unspecialised, every RMSNorm's eps (a float attribute) became a graph input that each call
        # wrapped in a tensor: 61 `torch.as_tensor` calls per SmolLM2 step, ~0.5 ms of a 27 ms batch-1 step.
        # The graphs take no float that changes between calls.
        torch._dynamo.config.specialize_float = True
        # Max-autotune prints a table of timings per GEMM shape (hundreds of lines); the log says one line per graph.
        torch._inductor.config.autotune_num_choices_displayed = 0
        torch._inductor.config.max_autotune_report_choices_stats = False  # two stderr lines per GEMM shape
        options = compile_options(self.cfg, self.device, self.float_gemms and not self.regional)
        if "options" in options:
            # No guards on the model's modules (~4600, 0.7 ms of a 9 ms step; docs/performance.md): nothing
            # changes a loaded model, and each runner's own copy of the step code keeps its graphs to itself.
            options["options"]["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            decode_fn, prefill_fn = _own_code(decode_fn), _own_code(prefill_fn)
        if self.regional:
            # One layer traced, its code reused by all (the KV cache is an argument of `run_layer`): compiles
            # in a quarter of the time, decode as fast (docs/performance.md, 2026-12-01).
            self.model.run_layer = torch.compiler.nested_compile_region(run_layer)
        frozen = torch._inductor.config.freezing  # as compile_options left it for this runner
        decode = torch.compile(decode_fn, **options, dynamic=self.backend.supports_dynamic_shapes)
        if not self.cfg.prefill:
            return _named(decode, DECODE_LABEL, frozen), None
        # CUDA graphs would record one graph per token count; there the prefill graph only fuses kernels.
        prefill = torch.compile(prefill_fn, **options, dynamic=True)
        return _named(decode, DECODE_LABEL, frozen), _named(prefill, "prefill graph ({} tokens)", frozen)

    def warm_up(self, decode_fn: DecodeFn, prefill_fn: PrefillFn) -> None:
        """Build the decode graphs (the smallest bucket, and the dynamic one for the others) and the prefill
        graph (at a full chunk) on rows that touch only the scratch page, then let steps use them. Runs on
        its own thread while steps run eagerly, so a server answers within seconds instead of after minutes
        of compilation (even setting up torch.compile, which imports inductor, is left to this thread: 2 s
        of start-up)."""
        start = time.perf_counter()
        # Tracing and lowering hold the GIL for long stretches, while an eager step releases it at every
        # torch op and then waits out the switch interval to get it back: at the default 5 ms a 0.7 s
        # first answer took 12 s. A short interval bounds that wait for as long as compilation runs.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            decode, prefill = self._compile(decode_fn, prefill_fn)
            # The inputs look like the runner's (made outside inference mode, none aliasing another):
            # dynamo guards on both, and a mismatch compiled every graph again on the first real step.
            # Steps of up to FEW_ROWS rows take the few-row paths (kernels/quant_linear.py: one graph per bucket for
            # quantized layers, one for float ones), more rows another graph.
            buckets, most = self.cfg.batch_buckets, self.decode_step_rows or 2 * FEW_ROWS
            sizes = [n for n in (*FEW_ROW_BUCKETS, 2 * FEW_ROWS) if n <= most]
            for b in sorted({buckets[0], *(min(buckets[-1], n) for n in sizes)}):
                batch = self._scratch_batch(b, 1)
                ids, meta = torch.zeros_like(batch.positions), DecodeStep(self.backend.prepare_decode(batch))
                with torch.inference_mode():
                    decode(ids, batch.positions, meta)
            if prefill is not None:
                self.warm_prefill(prefill)
        except Exception:
            log.exception("compiling the step graphs failed; steps stay eager")
            return
        finally:
            sys.setswitchinterval(switch_interval)
            self.warming_up = False
        self.decode, self.prefill = decode, prefill
        self.ready.set()
        log.info("step graphs compiled in %.0f s; steps now run compiled", time.perf_counter() - start)

    def warm_prefill(self, prefill: PrefillFn) -> None:
        """Build the prefill graph at a full chunk on rows that touch only the scratch page, once for each class
        of sampled-row counts a quantized head computes apart (kernels/quant_linear.py: up to each of
        FEW_ROW_BUCKETS, more): warmed up at 2 rows only, a step that prefilled 5 prompts, and then one of 9,
        compiled the graph again in the middle of a run (6-16 s each for SmolLM2). A float head takes one product
        for any count, so the later calls only run the graph."""
        batch = self._scratch_batch(1, self.prefill_tokens)
        ids = torch.zeros_like(batch.positions)
        for n in sorted({max(fewer + 1, self.prefill_logit_rows) for fewer in (0, *FEW_ROW_BUCKETS)}):
            rows = batch.positions[-n:].clone()  # made outside inference mode, as the runner's are
            with torch.inference_mode(), opaque_attention_step(self.backend, self.backend.prepare(batch)):
                prefill(ids, batch.positions, rows)

    def eager(self) -> contextlib.AbstractContextManager:
        """Wrap an eager step: excludes tracing on the warm-up thread while one runs (see _TRACING)."""
        return _TRACING if self.warming_up else contextlib.nullcontext()

    def _scratch_batch(self, rows: int, tokens: int) -> PagedBatch:
        """`rows` rows of `tokens` new tokens each that read and write only the scratch page."""
        dev, page_size = self.device, self.backend.page_size
        positions = torch.arange(tokens, device=dev).repeat(rows)
        width = self.backend.padded_pages(-(-tokens // page_size))
        length = self.backend.padded_query_len(tokens)
        pad_index = None
        if length > 1:
            pad_index = torch.arange(rows, device=dev).repeat_interleave(tokens) * length + positions
        return PagedBatch(
            positions=positions,
            slot_mapping=SCRATCH_PAGE * page_size + positions % page_size,
            page_table=torch.full((rows, width), SCRATCH_PAGE, dtype=torch.long, device=dev),
            seq_lens=torch.full((rows,), tokens, dtype=torch.long, device=dev),
            max_query_len=length,
            pad_index=pad_index,
            query_lens=[tokens] * rows,
            host_seq_lens=[tokens] * rows,
        )


def _own_code(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A bound method whose function has its own code object: torch.compile's graphs and guards attach to
    the code object, so this copy's graphs serve only this instance."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__kwdefaults__ = fn.__qualname__, fn.__kwdefaults__
    return types.MethodType(copy, method.__self__)


def _serialise_tracing() -> None:
    """Make every tracing window of this process hold _TRACING (once per process)."""
    fx_trace = torch.fx._symbolic_trace
    if getattr(fx_trace._new_patcher, "holds_engine_lock", False):
        return
    original = fx_trace._new_patcher

    @contextlib.contextmanager
    def patcher_under_lock() -> Iterator[Any]:
        with _TRACING, original() as patcher:
            yield patcher

    patcher_under_lock.holds_engine_lock = True
    fx_trace._new_patcher = patcher_under_lock


# The options that only serve fp32/bf16 GEMMs: inductor's C++ GEMM template, tuned per shape on frozen weights.
FLOAT_GEMM_OPTIONS = ("max_autotune", "max_autotune_gemm_backends", "freezing")


def compile_options(cfg: CompileConfig, device: torch.device, tune_float_gemms: bool = True) -> dict[str, Any]:
    """torch.compile's `mode` or `options` for the configured mode on this device. Without
    `tune_float_gemms` (a quantized model, or one layer's code shared by all layers, which cannot take
    frozen weights) the options that serve float GEMMs are left out."""
    if cfg.mode != "auto":
        if device.type == "cpu":
            inductor_fixes.apply()
        return {"mode": cfg.mode}
    if device.type == "cuda":
        # Inductor's defaults: CUDA graphs are captured by the engine (engine/cuda_graphs.py) or not at all.
        return {"options": {"triton.cudagraphs": False}}
    options = dict(cfg.cpu) | inductor_fixes.cache_key_options()
    if "fp_contract" in options:
        options["cpp.enable_floating_point_contract_flag"] = options.pop("fp_contract")
    if not tune_float_gemms:
        # No float GEMM to tune; freezing would fold the int8 -> float conversions into fp32 constants read
        # every step (int8 SmolLM2: 23 vs 84 tok/s, docs/performance.md).
        options = {k: v for k, v in options.items() if k not in FLOAT_GEMM_OPTIONS}
    # Inductor reads `freezing` before it applies per-call options, so it only works set globally.
    torch._inductor.config.freezing = bool(options.pop("freezing", False))
    return {"options": options}
