"""pytest-benchmark: the engine against transformers' batched generate on the same offline workload
(same model, dtype and requests). Not part of the normal test run (see README):

    python -m pytest tests/benchmarks --benchmark-autosave
    python -m pytest tests/benchmarks --benchmark-compare

ENGINE_BENCH_MODEL=/path/to/model and ENGINE_BENCH_EAGER=1 swap in another checkpoint and skip compilation
(the README's smoke test runs it that way on a tiny model).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from workloads import engine_generate, hf_generate, load_hf_model, random_requests  # noqa: E402

from engine import LLM  # noqa: E402

DTYPE = torch.float32
MODEL = os.environ.get("ENGINE_BENCH_MODEL")  # None: the embedded SmolLM2
EAGER = os.environ.get("ENGINE_BENCH_EAGER") == "1"
REQUESTS = random_requests(24, [16, 256], [16, 64], 49152, seed=0)


@pytest.fixture(scope="module")
def engine_llm():
    llm = LLM(MODEL, dtype=DTYPE, progress_bar=False, enforce_eager=EAGER)
    engine_generate(llm, REQUESTS[:4])  # compile outside the measurement
    return llm


@pytest.mark.benchmark(group="offline-smollm2")
def test_engine(benchmark, engine_llm):
    def run():
        engine_llm.engine.prefix_cache.reset()
        return engine_generate(engine_llm, REQUESTS)

    tokens = benchmark.pedantic(run, rounds=2, iterations=1)
    assert tokens == sum(n for _, n in REQUESTS)
    benchmark.extra_info["output_tokens_per_s"] = tokens / benchmark.stats.stats.mean


@pytest.mark.benchmark(group="offline-smollm2")
def test_transformers(benchmark):
    model = load_hf_model(MODEL, DTYPE)
    tokens = benchmark.pedantic(lambda: hf_generate(model, REQUESTS, batch_size=16), rounds=1, iterations=1)
    benchmark.extra_info["output_tokens_per_s"] = tokens / benchmark.stats.stats.mean
