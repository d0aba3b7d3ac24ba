"""The engine against llama.cpp on the same GGUF file, on this CPU: batch-1 decode, prefill of one long
prompt, and aggregate decode with `bench.batch` sequences at once. Greedy, token ids as prompts, the
same lengths on both sides; decode rates exclude the prefill (time to N tokens minus time to 1).

Fidelity in the same run (`bench.fidelity`): greedy continuations of FIDELITY_PROMPTS, all in one batch as a user
would send them, against transformers in fp32 on the file's dequantized weights: how many are identical to the
reference over `bench.fidelity_tokens`, and their mean common prefix, for every mode and for llama.cpp.

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
from omegaconf import DictConfig

from engine import LLM, SamplingParams
from engine.models.source import resolve_model
from engine.quant.base import weight_bytes
from engine.tokenizer import load_tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from workloads import engine_config, engine_generate, load_hf_model, record, resolve_bench_model  # noqa: E402

log = logging.getLogger("cpu_vs_llamacpp")
Rates = dict[str, float]
FIDELITY_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "1, 2, 3, 4,",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole,",
    "def fibonacci(n):",
    "Les mathématiques sont",
    "A quick brown fox jumps over the lazy dog while the cat watches from the window and",
    "Q: What is two plus two?\nA:",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea,",
]
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

    def __init__(self, path: str, threads: int, seqs: int, per_seq: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.model = llama_cpp.Llama(path, n_threads=threads, n_ctx=512, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max = seqs * per_seq, seqs
        params.n_batch, params.n_ubatch = seqs * per_seq, 512
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model._model.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model._model.model))

    def run(self, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of every prompt in `batch`, decoded together."""
        import numpy as np

        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        rows = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(batch) for pos, tok in enumerate(p)]
        ends = self._decode(rows)
        out: list[list[int]] = [[] for _ in batch]
        for step in range(new_tokens):
            logits = [lib.llama_get_logits_ith(self.ctx, i) for i in ends]
            last = [int(np.ctypeslib.as_array(x, shape=(self.vocab,)).argmax()) for x in logits]
            for tokens, tok in zip(out, last):
                tokens.append(tok)
            if step == new_tokens - 1:
                return out
            ends = self._decode([(tok, len(batch[s]) + step, s, True) for s, tok in enumerate(last)])
        return out

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


def reference_continuations(cfg: DictConfig, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers in fp32 on the checkpoint (a GGUF dequantized), greedy, one prompt at a time, EOS ignored
    (the whole sequence re-run per token: a few hundred short forwards, no cache API to follow)."""
    import torch

    model = load_hf_model(cfg.model.path, torch.float32)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            tokens = list(ids)
            for _ in range(new):
                tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            out.append(tokens[len(ids) :])
    return out


def agreement(got: list[list[int]], want: list[list[int]]) -> Rates:
    """Continuations identical to the reference, and the mean length of their common prefix."""
    prefixes = [
        next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w))) for g, w in zip(got, want)
    ]
    return {"identical": float(sum(g == w for g, w in zip(got, want))), "common_prefix": statistics.mean(prefixes)}


def engine_rates(cfg: DictConfig, mode: str, fidelity: tuple[list[list[int]], list[list[int]]] | None) -> Rates:
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
        measured = rates(run, b, vocab, b.repeats)
        if fidelity is not None:
            prompts, want = fidelity
            params = SamplingParams(max_tokens=len(want[0]), temperature=0, ignore_eos=True)
            outs = llm.generate_outputs(prompts, params)
            measured |= agreement([o.outputs[0].token_ids for o in outs], want)
        return measured


@hydra.main(config_path="../configs", config_name="cpu_vs_llamacpp", version_base=None)
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    if b.repeats < 1:
        raise ValueError(f"bench.repeats={b.repeats} must be at least 1")
    resolve_bench_model(cfg)
    source = resolve_model(cfg.model.path)
    fidelity = None
    if b.fidelity:
        prompts = [load_tokenizer(source).encode(p) for p in FIDELITY_PROMPTS]
        fidelity = prompts, reference_continuations(cfg, prompts, b.fidelity_tokens)
        log.info("reference continuations: transformers fp32, %d prompts", len(prompts))
    results: dict[str, Rates] = {}
    if b.llama_cpp:
        if not source.is_gguf:
            raise SystemExit(f"model.path={cfg.model.path}: llama.cpp needs a .gguf file (or bench.llama_cpp=false)")
        longest = max((len(p) for p in fidelity[0]), default=0) + b.fidelity_tokens if fidelity else 0
        per_seq = max(b.prefill_tokens, b.prompt_tokens + b.new_tokens, longest) + 16
        llama = LlamaCpp(str(source.path), b.threads, max(b.batch, len(FIDELITY_PROMPTS)), per_seq)
        results["llama.cpp"] = rates(llama.run, b, llama.vocab, b.repeats)
        if fidelity is not None:
            results["llama.cpp"] |= agreement(llama.run(fidelity[0], b.fidelity_tokens), fidelity[1])
        log.info("llama.cpp: %s", results["llama.cpp"])
    for mode in b.modes:
        results[f"engine quant={mode}"] = engine_rates(cfg, mode, fidelity)
        # The next mode gets the process to itself: with the int8 engine left alive, int4's 32-row decode
        # that followed it ran at 182 tok/s against 333 alone (2026-12-01).
        gc.collect()
        log.info("engine quant=%s: %s", mode, results[f"engine quant={mode}"])
    base = results.get("llama.cpp")
    for name, r in results.items():
        ratios = {f"{k}_vs_llama_cpp": v / base[k] for k, v in r.items() if k.endswith("tok_s")} if base else {}
        record({"label": name, **r, **ratios}, cfg)
        log.info(
            "%-20s %s",
            name,
            "  ".join(
                f"{k} {v:.1f}" + (f" ({ratios[k + '_vs_llama_cpp']:.2f}x)" if k + "_vs_llama_cpp" in ratios else "")
                for k, v in r.items()
            ),
        )


if __name__ == "__main__":
    main()
