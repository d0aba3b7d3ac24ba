"""Offline throughput (nano-vllm's benchmark): N random prompts, random output lengths, ignore_eos.

    python experiments/offline_throughput.py
    python experiments/offline_throughput.py bench.compare_hf=true dtype=float32
    python experiments/offline_throughput.py -m scheduler=fcfs,lpm cache=radix,none attention=sdpa,flex
    python experiments/offline_throughput.py model=qwen3 model.path=random-qwen3-0.6b
"""
from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(__file__))
from workloads import (engine_generate, hf_generate, load_hf_model, plot, random_requests, record,  # noqa: E402
                       resolve_bench_model)

log = logging.getLogger("offline_throughput")


def background_load() -> float:
    return os.getloadavg()[0]


@hydra.main(config_path="../configs", config_name="offline_throughput", version_base=None)
def main(cfg: DictConfig) -> float:
    from engine import LLM
    from engine.llm_engine import parse_dtype

    resolve_bench_model(cfg)
    b = cfg.bench
    load_before = background_load()
    t = time.perf_counter()
    llm = LLM(config=cfg)
    load_s = time.perf_counter() - t
    requests = random_requests(b.num_requests, list(b.input_len), list(b.output_len),
                               llm.engine.model_config.vocab_size, b.seed)
    engine_generate(llm, requests[:4])  # warm-up: compiles the decode graphs
    llm.engine.prefix_cache.reset()
    t = time.perf_counter()
    tokens = engine_generate(llm, requests, use_tqdm=True)
    elapsed = time.perf_counter() - t
    result = {"requests": len(requests), "output_tokens": tokens, "seconds": round(elapsed, 2),
              "tokens_per_s": round(tokens / elapsed, 1), "load_s": round(load_s, 1),
              "preemptions": llm.engine.stats()["preemptions"], "loadavg_before": load_before}
    log.info("engine: %d tokens in %.1f s = %.1f tok/s", tokens, elapsed, tokens / elapsed)
    if b.compare_hf:
        hf = load_hf_model(cfg.model.path, parse_dtype(cfg.dtype, cfg.device), cfg.device)
        t = time.perf_counter()
        hf_tokens = hf_generate(hf, requests, b.hf_batch_size)
        hf_elapsed = time.perf_counter() - t
        result["hf_tokens_per_s"] = round(hf_tokens / hf_elapsed, 1)
        result["speedup_vs_hf"] = round((tokens / elapsed) / (hf_tokens / hf_elapsed), 2)
        log.info("transformers: %.1f tok/s; engine / transformers = %.2fx", hf_tokens / hf_elapsed,
                 result["speedup_vs_hf"])
    out = record(result, cfg)
    log.info("results in %s (plot %s)", out, plot(out, "tokens_per_s", "offline throughput (output tok/s)"))
    return result["tokens_per_s"]


if __name__ == "__main__":
    main()
