"""Grammar libraries for constrained decoding, measured on this machine with the served model's tokenizer:
llguidance (what the engine uses) and xgrammar. For each schema in experiments/schemas.json: the time to
turn it into a matcher, and the time to fill next-token bitmasks for batches of matchers, step by step
along one token sequence valid for the schema (found by a random walk under llguidance's masks).

    python experiments/grammar_backends.py
    python experiments/grammar_backends.py model=qwen3 model.path=/models/Qwen3-0.6B
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

import hydra
import llguidance
import llguidance.hf
import llguidance.torch as llg_torch
import torch
import xgrammar
from omegaconf import DictConfig

from engine.models.loader import load_config
from engine.models.source import resolve_model
from engine.structured import JSON_LAYOUT, unpack_bitmask
from engine.tokenizer import load_tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from workloads import plot, record, resolve_bench_model  # noqa: E402

log = logging.getLogger("grammar_backends")
SCHEMAS = json.loads((Path(__file__).parent / "schemas.json").read_text())


def valid_walk(
    tokenizer: llguidance.LLTokenizer, grammar: str, vocab: int, steps: int, rng: random.Random
) -> list[int]:
    """Up to `steps` tokens the grammar allows, picked at random among the allowed ones."""
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    bitmask = llg_torch.allocate_token_bitmask(1, vocab)
    tokens = []
    while len(tokens) < steps and not matcher.is_stopped():
        llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)
        allowed = unpack_bitmask(bitmask, vocab)[0].nonzero().flatten().tolist()
        token = rng.choice(allowed)
        matcher.consume_token(token)
        tokens.append(token)
    return tokens


def time_llguidance(tokenizer, grammar: str, tokens: list[int], batch: int, vocab: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch)]
    build = (time.perf_counter() - start) / batch
    bitmask = llg_torch.allocate_token_bitmask(batch, vocab)
    steps = []
    for token in tokens:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            llg_torch.fill_next_token_bitmask(m, bitmask, i)
        steps.append(time.perf_counter() - start)
        for m in matchers:
            m.consume_token(token)
    return build, steps


def time_xgrammar(compiler, schema: dict, tokens: list[int], batch: int, vocab: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
    build = time.perf_counter() - start
    bitmask = xgrammar.allocate_token_bitmask(batch, vocab)
    steps = []
    for token in tokens:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        steps.append(time.perf_counter() - start)
        for m in matchers:
            m.accept_token(token)
    return build, steps


@hydra.main(config_path="../configs", config_name="grammar_backends", version_base=None)
def main(cfg: DictConfig) -> None:
    resolve_bench_model(cfg)
    b = cfg.bench
    torch.set_num_threads(1)  # the engine fills masks on its one scheduling thread
    source = resolve_model(cfg.model.path)
    vocab = load_config(source).vocab_size
    hf_tokenizer = load_tokenizer(source)
    start = time.perf_counter()
    llg_tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
    llg_setup = time.perf_counter() - start
    start = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab))
    xgr_setup = time.perf_counter() - start
    rng = random.Random(b.seed)
    for backend in ("llguidance", "xgrammar"):
        builds, masks = [], {n: [] for n in b.batch_sizes}
        for schema in SCHEMAS[: b.num_schemas]:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            tokens = valid_walk(llg_tok, grammar, vocab, b.steps, rng)
            for n in b.batch_sizes:
                if backend == "llguidance":
                    build, steps = time_llguidance(llg_tok, grammar, tokens, n, vocab)
                else:
                    build, steps = time_xgrammar(compiler, schema, tokens, n, vocab)
                masks[n].extend(steps)
                if n == b.batch_sizes[0]:
                    builds.append(build)
        result = {
            "label": backend,
            "tokenizer_setup_s": llg_setup if backend == "llguidance" else xgr_setup,
            "schemas": len(builds),
            "build_ms_median": statistics.median(builds) * 1e3,
            "build_ms_max": max(builds) * 1e3,
            **{f"mask_ms_b{n}_median": statistics.median(v) * 1e3 for n, v in masks.items()},
            **{f"mask_ms_b{n}_p99": sorted(v)[int(0.99 * (len(v) - 1))] * 1e3 for n, v in masks.items()},
        }
        log.info("%s", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        out = record(result, cfg)
    metric = f"mask_ms_b{b.batch_sizes[-1]}_median"
    log.info("results in %s (plot %s)", out, plot(out, metric, f"next-token mask fill, batch {b.batch_sizes[-1]} (ms)"))


if __name__ == "__main__":
    main()
