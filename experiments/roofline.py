"""Roofline report: this machine's read bandwidth, the decode-step floors (weight bytes / bandwidth, and the
model's products run as fp32 GEMMs alone), and the measured decode step at each batch size.

    python experiments/roofline.py
    python experiments/roofline.py dtype=float32 compile.enabled=false
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter

import hydra
from omegaconf import DictConfig

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.quant.base import weight_bytes

sys.path.insert(0, os.path.dirname(__file__))
from matmul_bound import matmul_seconds  # noqa: E402
from workloads import read_bandwidth_gbs, record, resolve_bench_model  # noqa: E402

log = logging.getLogger("roofline")


def gemm_floor_ms(llm: LLM, rows: int) -> float:
    """A decode step of `rows` rows made of nothing but the model's linear layers and LM head as GEMMs in the
    model's dtype on weights already in float (`matmul_bound.matmul_seconds`): no dequantization, attention or
    norms. Where the step is bound by arithmetic (a quantized model's batched steps on a CPU without integer dot
    products) no float formulation runs faster (SmolLM2 at 32 rows in fp32 on AVX2: 102 ms, 84 GFLOP/s, against
    63 ms for 2.5x llama.cpp; docs/performance.md)."""
    steps = Counter({(rows, rows): 1})  # one step: every row through the layers and the head
    eng = llm.engine
    seconds, _, _ = matmul_seconds(eng.model_config, eng.dtype, "cpu", steps, repeats=7, bandwidth_gbs=1.0)
    return 1000 * seconds


def decode_step_ms(llm, batch: int, context: int, steps: int) -> float:
    eng = llm.engine
    # Prefill is chunked by the token budget: the first rows decode while later ones still prefill, so
    # they must run long enough for `steps` steps with every row decoding.
    prefill_steps = -(-batch * context // int(eng.cfg.scheduler.max_num_batched_tokens))
    params = SamplingParams(max_tokens=steps + prefill_steps + 2, temperature=0, ignore_eos=True)
    prompts = [[100 + i] + [200] * (context - 1) for i in range(batch)]
    times = []
    original = eng.runner.run

    def timed(b, *args):
        t = time.perf_counter()
        out = original(b, *args)
        if b.is_decode_only and len(b.seqs) == batch:
            times.append(time.perf_counter() - t)
        return out

    eng.runner.run = timed
    try:
        llm.generate_outputs(prompts, params, use_tqdm=False)
    finally:
        eng.runner.run = original
        eng.prefix_cache.reset()
    if not times:
        raise RuntimeError(
            f"no decode step ran all {batch} rows at once: raise scheduler.max_running_requests or kv_cache.memory_mb"
        )
    times.sort()
    return 1000 * times[len(times) // 2]


@hydra.main(config_path="../configs", config_name="roofline", version_base=None)
def main(cfg: DictConfig) -> None:
    resolve_bench_model(cfg)
    b = cfg.bench
    llm = LLM(config=EngineConfig.from_dictconfig(cfg))
    # A step reads all but an untied embedding table, of which it reads only its tokens' rows (a tied table is
    # read whole as the LM head): counted whole, it overstated the 0.6B model's batch-1 floor by 155 M weights.
    weights = weight_bytes(llm.engine.model, skip="embed_tokens.")
    log.info("a step reads %.0f MB of weights (%s, quant=%s)", weights / 2**20, llm.engine.dtype, cfg.quant._target_)
    decode_step_ms(llm, 1, b.context_len, 4)  # warm-up / compile
    for batch in b.batch_sizes:
        # This machine's bandwidth drifts by 20% over minutes: the floor comes from probes taken just
        # before and just after the steps it is compared with.
        before = read_bandwidth_gbs(b.bandwidth_mb)
        ms = decode_step_ms(llm, batch, b.context_len, b.steps)
        after = read_bandwidth_gbs(b.bandwidth_mb)
        bw = (before + after) / 2
        floor_ms = weights / (bw * 1e9) * 1000
        gemm_ms = gemm_floor_ms(llm, batch)
        log.info(
            "batch %3d: %.1f ms/step = %.2fx floor (%.1f ms at %.1f GB/s: %.1f before, %.1f after), %.1f tok/s; "
            "its products as GEMMs alone (%s) %.1f ms (%.0f tok/s at most that way)",
            batch,
            ms,
            ms / floor_ms,
            floor_ms,
            bw,
            before,
            after,
            batch * 1000 / ms,
            str(llm.engine.dtype).removeprefix("torch."),
            gemm_ms,
            batch * 1000 / gemm_ms,
        )
        record(
            {
                "batch": batch,
                "step_ms": ms,
                "floor_ms": floor_ms,
                "x_floor": ms / floor_ms,
                "gemm_floor_ms": gemm_ms,
                "tokens_per_s": batch * 1000 / ms,
                "bandwidth_gbs": bw,
                "bandwidth_before_after": f"{before:.1f};{after:.1f}",
                "loadavg": os.getloadavg()[0],
            },
            cfg,
        )


if __name__ == "__main__":
    main()
