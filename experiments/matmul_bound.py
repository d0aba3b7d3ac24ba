"""How fast could the offline workload run here if only its matmuls took time?

Runs the offline workload through the engine once, recording every step's token count and logit rows,
then times the model's linear layers alone (ATen `F.linear`, i.e. MKL; fastest of a few repeats) at each
step's shape. From those it builds a roofline bound: each step takes the longer of reading its weights
once at the probed bandwidth and doing its FLOPs at the best rate any step reached, with attention,
norms, sampling and scheduling free. No engine runs this schedule faster here without a faster GEMM than
MKL's best; transformers runs the same requests in the same process, so the report says which speed-up
over it this machine allows at all.

    python experiments/matmul_bound.py dtype=float32
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from engine import LLM
from engine.config import EngineConfig
from engine.models.transformer import ModelConfig

sys.path.insert(0, os.path.dirname(__file__))
from workloads import (  # noqa: E402
    engine_generate,
    hf_generate,
    load_hf_model,
    offline_workload,
    plot,
    read_bandwidth_gbs,
    record,
    resolve_bench_model,
)

if TYPE_CHECKING:
    import torch


log = logging.getLogger("matmul_bound")


def record_schedule(llm: LLM) -> list[tuple[int, int]]:
    """Wraps the scheduler so each step appends (new tokens, rows that get logits)."""
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule
    steps: list[tuple[int, int]] = []

    def recorded():
        batch = schedule()
        steps.append((sum(batch.num_new_tokens), len(batch.sampling_rows)))
        return batch

    scheduler.schedule = recorded
    return steps


def linear_shapes(mc: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every linear layer a token passes through, lm_head excluded."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    layer = [
        (mc.hidden_size, q + 2 * kv),
        (q, mc.hidden_size),
        (mc.hidden_size, 2 * mc.intermediate_size),
        (mc.intermediate_size, mc.hidden_size),
    ]
    return layer * mc.num_layers


def fastest(fn: Callable[[], None], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_seconds(
    mc: ModelConfig, dtype: torch.dtype, device: str, steps: Counter, repeats: int, bandwidth_gbs: float
) -> tuple[float, float, float]:
    """For the recorded steps ((token rows, logit rows) -> count): the model's matmuls timed through ATen at
    each step's shape, summed; the best rate (GFLOP/s) any step reached; and a roofline bound in which
    every step takes the longer of reading its weights once at `bandwidth_gbs` and its FLOPs at that
    best rate."""

    shapes = linear_shapes(mc)
    weights = {shape: torch.randn(shape[1], shape[0], dtype=dtype, device=device) for shape in set(shapes)}
    lm_head = torch.randn(mc.vocab_size, mc.hidden_size, dtype=dtype, device=device)

    def step(x: dict[int, torch.Tensor], hidden: torch.Tensor) -> None:
        for shape in shapes:
            F.linear(x[shape[0]], weights[shape])
        if len(hidden):
            F.linear(hidden, lm_head)
        if device == "cuda":
            torch.cuda.synchronize()

    layer_params = sum(i * o for i, o in shapes)
    measured = {}  # (tokens, logit rows) -> (seconds, flops, weight bytes)
    with torch.inference_mode():
        for tokens, logit_rows in steps:
            x = {k: torch.randn(tokens, k, dtype=dtype, device=device) for k, _ in shapes}
            hidden = torch.randn(logit_rows, mc.hidden_size, dtype=dtype, device=device)
            flops = 2 * (tokens * layer_params + logit_rows * lm_head.numel())
            nbytes = (layer_params + (lm_head.numel() if logit_rows else 0)) * lm_head.element_size()
            measured[tokens, logit_rows] = fastest(functools.partial(step, x, hidden), repeats), flops, nbytes
    best_rate = max(flops / seconds for seconds, flops, _ in measured.values())
    total = sum(steps[k] * seconds for k, (seconds, _, _) in measured.items())
    bound = sum(
        steps[k] * max(nbytes / (bandwidth_gbs * 1e9), flops / best_rate) for k, (_, flops, nbytes) in measured.items()
    )
    return total, best_rate / 1e9, bound


@hydra.main(config_path="../configs", config_name="offline_throughput", version_base=None)
def main(cfg: DictConfig) -> float:
    resolve_bench_model(cfg)
    b = cfg.bench
    dtype = EngineConfig.from_dictconfig(cfg).torch_dtype
    llm, requests, _ = offline_workload(cfg)
    llm.engine.prefix_cache.reset()
    steps = record_schedule(llm)
    t = time.perf_counter()
    tokens = engine_generate(llm, requests, use_tqdm=True)
    engine_s = time.perf_counter() - t
    hf = load_hf_model(cfg.model.path, dtype, cfg.device)
    t = time.perf_counter()
    hf_generate(hf, requests, b.hf_batch_size)
    hf_s = time.perf_counter() - t
    del hf
    bandwidth = read_bandwidth_gbs(512)
    matmul_s, best_gflops, bound_s = matmul_seconds(
        llm.engine.model_config, dtype, cfg.device, Counter(steps), 3, bandwidth
    )
    result = {
        "requests": len(requests),
        "output_tokens": tokens,
        "steps": len(steps),
        "engine_s": engine_s,
        "hf_s": hf_s,
        "matmul_s": matmul_s,
        "best_gflops": best_gflops,
        "roofline_s": bound_s,
        "speedup_vs_hf": hf_s / engine_s,
        "max_speedup_vs_hf": hf_s / bound_s,
        "engine_over_bound": engine_s / bound_s,
        "bandwidth_gbs": bandwidth,
    }
    log.info(
        "engine %.1f s, transformers %.1f s (%.2fx); its matmuls through ATen %.1f s (best %.0f GFLOP/s); "
        "roofline at %.1f GB/s and that rate %.1f s: at most %.2fx over transformers",
        engine_s,
        hf_s,
        hf_s / engine_s,
        matmul_s,
        best_gflops,
        bandwidth,
        bound_s,
        hf_s / bound_s,
    )
    out = record(result, cfg)
    log.info("results in %s (plot %s)", out, plot(out, "max_speedup_vs_hf", "most speed-up over transformers allowed"))
    return result["max_speedup_vs_hf"]


if __name__ == "__main__":
    main()
