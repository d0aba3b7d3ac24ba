"""The engine against llama.cpp on the same GGUF file, on this CPU: batch-1 decode, prefill of one long
prompt, and aggregate decode with `bench.batch` sequences at once. Greedy, token ids as prompts, the
same lengths on both sides; decode rates exclude the prefill (time to N tokens minus time to 1).

llama.cpp comes from llama-cpp-python, which builds it from source (about 6 minutes on 2 cores), so it
is installed for this benchmark only:

    pip install llama-cpp-python
    python experiments/cpu_vs_llamacpp.py
    python experiments/cpu_vs_llamacpp.py bench.modes=[int8] bench.llama_cpp=false   # any checkpoint
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from engine import LLM
from engine.config import CONFIG_DIR, EngineConfig
from engine.models.source import resolve_model
from engine.quant.base import weight_bytes

sys.path.insert(0, os.path.dirname(__file__))
from workloads import engine_generate, record, resolve_bench_model  # noqa: E402

log = logging.getLogger("cpu_vs_llamacpp")
Rates = dict[str, float]
FRESH = itertools.count(1, 1000)  # a new prompt offset for every call: no prefix-cache hits, warm-up included


def prompts(count: int, length: int, vocab: int, offset: int) -> list[list[int]]:
    return [[1 + (offset + s * 7919 + j * 104729) % (vocab - 2) for j in range(length)] for s in range(count)]


def rates(run: Callable[[list[list[int]], int], None], b: DictConfig, vocab: int, repeats: int = 1) -> Rates:
    """Prefill, batch-1 decode and batched decode tok/s of `run(prompts, new_tokens)` (greedy), each the
    median of `repeats` measurements."""

    def timed(count: int, length: int, new: int) -> float:
        batch = prompts(count, length, vocab, next(FRESH))
        t = time.perf_counter()
        run(batch, new)
        return time.perf_counter() - t

    def median(measure: Callable[[], float]) -> float:
        return statistics.median(measure() for _ in range(repeats))

    decode, p, n = b.new_tokens - 1, b.prompt_tokens, b.batch
    return {
        "prefill_tok_s": median(lambda: b.prefill_tokens / timed(1, b.prefill_tokens, 1)),
        "decode_b1_tok_s": median(lambda: decode / (timed(1, p, b.new_tokens) - timed(1, p, 1))),
        f"decode_b{n}_tok_s": median(lambda: n * decode / (timed(n, p, b.new_tokens) - timed(n, p, 1))),
    }


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: one context with a sequence slot per row."""

    def __init__(self, path: str, b: DictConfig) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.model = llama_cpp.Llama(path, n_threads=b.threads, n_ctx=512, verbose=False)
        params = llama_cpp.llama_context_default_params()
        seqs = max(b.batch, 1)
        per_seq = max(b.prefill_tokens, b.prompt_tokens + b.new_tokens) + 16
        params.n_ctx, params.n_seq_max = seqs * per_seq, seqs
        params.n_batch, params.n_ubatch = seqs * per_seq, 512
        params.n_threads = params.n_threads_batch = b.threads
        self.ctx = llama_cpp.llama_init_from_model(self.model._model.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model._model.model))

    def run(self, batch: list[list[int]], new_tokens: int) -> None:
        import numpy as np

        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        rows = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(batch) for pos, tok in enumerate(p)]
        ends = self._decode(rows)
        for step in range(new_tokens):
            logits = [lib.llama_get_logits_ith(self.ctx, i) for i in ends]
            last = [int(np.ctypeslib.as_array(x, shape=(self.vocab,)).argmax()) for x in logits]
            if step == new_tokens - 1:
                return
            ends = self._decode([(tok, len(batch[s]) + step, s, True) for s, tok in enumerate(last)])

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        lib = self.lib
        batch = lib.llama_batch_init(len(rows), 0, 1)
        try:
            for i, (tok, pos, seq, logits) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(rows)
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            lib.llama_batch_free(batch)
        return [i for i, row in enumerate(rows) if row[3]]


def engine_config(cfg: DictConfig, mode: str) -> EngineConfig:
    """The engine's config for `mode`: with no other override, what a plain `LLM(quant=mode)` gets (a test
    holds it to that)."""
    cfg = cfg.copy()
    cfg.quant = OmegaConf.load(CONFIG_DIR / "quant" / f"{mode}.yaml")  # the group's choice, as quant=<mode> picks it
    return EngineConfig.from_dictconfig(cfg)


def engine_rates(cfg: DictConfig, mode: str) -> Rates:
    t = time.perf_counter()
    with LLM(config=engine_config(cfg, mode)) as llm:
        log.info(
            "engine quant=%s: loaded in %.1f s, %.0f MB of weights",
            mode,
            time.perf_counter() - t,
            weight_bytes(llm.engine.model) / 2**20,
        )

        def run(batch: list[list[int]], new: int) -> None:
            engine_generate(llm, [(p, new) for p in batch])

        b, vocab = cfg.bench, llm.engine.model_config.vocab_size
        t = time.perf_counter()
        rates(run, b, vocab)  # warm-up: compiles the decode graphs (batch 1 and the rest) and the prefill graph
        log.info("engine quant=%s: warm-up (compilation) %.0f s", mode, time.perf_counter() - t)
        return rates(run, b, vocab, b.repeats)


@hydra.main(config_path="../configs", config_name="cpu_vs_llamacpp", version_base=None)
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    if b.repeats < 1:
        raise ValueError(f"bench.repeats={b.repeats} must be at least 1")
    resolve_bench_model(cfg)
    source = resolve_model(cfg.model.path)
    results: dict[str, Rates] = {}
    if b.llama_cpp:
        if not source.is_gguf:
            raise SystemExit(f"model.path={cfg.model.path}: llama.cpp needs a .gguf file (or bench.llama_cpp=false)")
        llama = LlamaCpp(str(source.path), b)
        results["llama.cpp"] = rates(llama.run, b, llama.vocab, b.repeats)
        log.info("llama.cpp: %s", results["llama.cpp"])
    for mode in b.modes:
        results[f"engine quant={mode}"] = engine_rates(cfg, mode)
        # The next mode gets the process to itself: with the int8 engine left alive, int4's 32-row decode
        # that followed it ran at 182 tok/s against 333 alone (2026-12-01).
        gc.collect()
        log.info("engine quant=%s: %s", mode, results[f"engine quant={mode}"])
    base = results.get("llama.cpp")
    for name, r in results.items():
        ratios = {f"{k}_vs_llama_cpp": v / base[k] for k, v in r.items()} if base else {}
        record({"label": name, **r, **ratios}, cfg)
        log.info(
            "%-20s %s",
            name,
            "  ".join(
                f"{k} {v:.1f}" + (f" ({ratios[k + '_vs_llama_cpp']:.2f}x)" if ratios else "") for k, v in r.items()
            ),
        )


if __name__ == "__main__":
    main()
