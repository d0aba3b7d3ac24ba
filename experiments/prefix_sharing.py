"""Prefix-sharing workload: many requests that share one long system prompt.

python experiments/prefix_sharing.py -m cache=radix,none scheduler=fcfs,lpm
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import hydra
from omegaconf import DictConfig

from engine import LLM
from engine.config import EngineConfig

sys.path.insert(0, os.path.dirname(__file__))
from workloads import engine_generate, plot, record, resolve_bench_model  # noqa: E402

log = logging.getLogger("prefix_sharing")


@hydra.main(config_path="../configs", config_name="prefix_sharing", version_base=None)
def main(cfg: DictConfig) -> float:
    resolve_bench_model(cfg)
    b = cfg.bench
    llm = LLM(config=EngineConfig.from_dictconfig(cfg))
    rng = random.Random(b.seed)
    vocab = llm.engine.model_config.vocab_size
    shared = [rng.randrange(100, vocab - 100) for _ in range(b.shared_prefix_len)]
    requests = [
        (shared + [rng.randrange(100, vocab - 100) for _ in range(rng.randint(*b.suffix_len))], b.output_len)
        for _ in range(b.num_requests)
    ]
    # Warm-up on unrelated prompts: two rows, then one alone, so both decode graphs (batch 1 and dynamic)
    # are compiled before the clock starts.
    engine_generate(llm, [([7] * 20, 4), ([7] * 20, 8)])
    llm.engine.prefix_cache.reset()
    t = time.perf_counter()
    tokens = engine_generate(llm, requests, use_tqdm=True)
    elapsed = time.perf_counter() - t
    prompt_tokens = sum(len(p) for p, _ in requests)
    result = {
        "requests": len(requests),
        "seconds": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "total_tokens_per_s": (prompt_tokens + tokens) / elapsed,
    }
    log.info(
        "%s: %d requests in %.1f s (%.2f req/s)",
        cfg.cache._target_.rsplit(".", 1)[-1],
        len(requests),
        elapsed,
        len(requests) / elapsed,
    )
    out = record(result, cfg)
    plot(out, "requests_per_s", "shared-prefix workload (requests/s)")
    return result["requests_per_s"]


if __name__ == "__main__":
    main()
