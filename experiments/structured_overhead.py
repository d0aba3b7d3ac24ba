"""What constrained decoding costs a batch: decode step time with half the sequences under a JSON schema
(16 + 16 at the default size) against the same batch with none constrained, in the same process,
alternating, median of the rounds.

    python experiments/structured_overhead.py dtype=float32
    python experiments/structured_overhead.py bench.batch=8 compile.enabled=false
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import sys
import time

import hydra
from omegaconf import DictConfig

from engine import LLM, SamplingParams
from engine.config import EngineConfig

sys.path.insert(0, os.path.dirname(__file__))
from workloads import plot, record, resolve_bench_model, word_prompt  # noqa: E402

log = logging.getLogger("structured_overhead")
# A string that cannot close within the timed steps: the constrained rows stay constrained throughout.
LONG_TEXT = {
    "type": "object",
    "properties": {"summary": {"type": "string", "minLength": 4000}, "n": {"type": "integer"}},
    "required": ["summary", "n"],
}


def decode_step_ms(llm: LLM, prompts: list[list[int]], constrained: int, steps: int) -> float:
    """Mean time of `steps` decode steps once every sequence is past its prefill."""
    engine = llm.engine
    budget = steps + 8
    for i, ids in enumerate(prompts):
        schema = LONG_TEXT if i < constrained else None
        engine.add_sequence(f"s{i}", ids, SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True,
                                                          json_schema=schema))  # fmt: skip
    while any(s.num_output_tokens == 0 for s in engine.seqs.values()):  # prefill (and the first tokens)
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for seq_id in list(engine.seqs):
        engine.abort_sequence(seq_id)
    engine.prefix_cache.reset()
    return statistics.fmean(times) * 1e3


@hydra.main(config_path="../configs", config_name="structured_overhead", version_base=None)
def main(cfg: DictConfig) -> None:
    resolve_bench_model(cfg)
    b = cfg.bench
    llm = LLM(config=EngineConfig.from_dictconfig(cfg))
    rng = random.Random(b.seed)
    prompts = [llm.encode(word_prompt(rng, b.prompt_len)) for _ in range(b.batch)]
    decode_step_ms(llm, prompts, b.batch // 2, 4)  # warm-up: compiles the graphs, builds the grammar tokenizer
    rounds = []
    for i in range(b.rounds):
        free = decode_step_ms(llm, prompts, 0, b.decode_steps)
        mixed = decode_step_ms(llm, prompts, b.batch // 2, b.decode_steps)
        rounds.append((mixed / free - 1, free, mixed))
        log.info("round %d: free %.2f ms, half constrained %.2f ms per step (%+.1f%%)", i + 1, free, mixed,
                 100 * (mixed / free - 1))  # fmt: skip
    overhead, free, mixed = sorted(rounds)[(len(rounds) - 1) // 2]
    result = {"batch": b.batch, "constrained": b.batch // 2, "free_step_ms": free, "mixed_step_ms": mixed,
              "overhead_pct": 100 * overhead}  # fmt: skip
    log.info("median round: %+.1f%% step time with %d of %d rows constrained", 100 * overhead, b.batch // 2, b.batch)
    out = record(result, cfg)
    log.info("results in %s (plot %s)", out, plot(out, "overhead_pct", "decode step overhead of constraints (%)"))


if __name__ == "__main__":
    main()
