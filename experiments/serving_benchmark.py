"""Online serving benchmark: drive the real server with the openai SDK at a fixed concurrency or a
Poisson request rate; report TTFT, inter-token latency and end-to-end latency (mean, p50, p90, p99)
and throughput.

    python experiments/serving_benchmark.py                      # starts server.py itself
    python experiments/serving_benchmark.py bench.url=http://127.0.0.1:8000 bench.concurrency=32
    python experiments/serving_benchmark.py -m bench.concurrency=1,4,16 cache=radix,none
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import hydra
import openai
from omegaconf import DictConfig
from tqdm.auto import tqdm

from engine.models.loader import load_config
from engine.models.source import resolve_model, served_model_name

sys.path.insert(0, os.path.dirname(__file__))
from workloads import free_port, plot, random_requests, record, resolve_bench_model, wait_until_up  # noqa: E402

log = logging.getLogger("serving")
ROOT = Path(__file__).resolve().parent.parent


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {
        "mean": statistics.fmean(v) * 1000,
        "p50": pick(0.5) * 1000,
        "p90": pick(0.9) * 1000,
        "p99": pick(0.99) * 1000,
    }


def start_server(cfg: DictConfig, warmup: str | None = "lazy") -> tuple[subprocess.Popen, str]:
    """`python server.py` with this run's overrides on a free port, once healthy. `warmup` overrides
    compile.warmup unless the run sets it (lazy: the benchmark's warm-up requests wait for compilation)."""
    port = free_port()
    hc = hydra.core.hydra_config.HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("bench.")]
    cmd = [
        sys.executable,
        "server.py",
        *overrides,
        f"server.port={port}",
        f"hydra.run.dir={hc.runtime.output_dir}/server",
    ]
    if warmup and not any(o.startswith("compile.warmup=") for o in overrides):
        cmd.append(f"compile.warmup={warmup}")
    if cfg.model.path and not any(o.startswith("model.path=") for o in overrides):
        cmd.append(f"model.path={cfg.model.path}")
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    wait_until_up(proc, url, "the server", 900)
    return proc, url


async def run_load(
    url: str, model: str, requests: list[tuple[list[int], int]], concurrency: int, rate: float | None, seed: int
) -> dict:

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", timeout=600, max_retries=0)
    sem = asyncio.Semaphore(concurrency if rate is None else len(requests))
    ttft, itl, e2e, tokens = [], [], [], 0
    bar = tqdm(total=len(requests), desc="requests")

    async def one(prompt: list[int], max_tokens: int) -> None:
        nonlocal tokens
        async with sem:
            start = time.perf_counter()
            last = None
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    (ttft.append(now - start) if last is None else itl.append(now - last))
                    last = now
            e2e.append(time.perf_counter() - start)
            bar.update(1)

    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks = []
    for prompt, n in requests:
        tasks.append(asyncio.create_task(one(prompt, n)))
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    bar.close()
    await client.close()
    return {
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(requests) / elapsed,
        **{f"ttft_{k}_ms": v for k, v in percentiles(ttft).items()},
        **{f"itl_{k}_ms": v for k, v in percentiles(itl).items()},
        **{f"e2e_{k}_ms": v for k, v in percentiles(e2e).items()},
    }


@hydra.main(config_path="../configs", config_name="serving", version_base=None)
def main(cfg: DictConfig) -> float:
    resolve_bench_model(cfg)
    b = cfg.bench
    vocab = load_config(resolve_model(cfg.model.path)).vocab_size
    requests = random_requests(b.num_requests, list(b.input_len), list(b.output_len), vocab, b.seed)
    proc, url = (None, b.url) if b.url else start_server(cfg)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"] if url else served_model_name(None, None)
        asyncio.run(run_load(url, model, requests[:2], 2, None, b.seed))  # warm-up (compile)
        result = asyncio.run(run_load(url, model, requests, b.concurrency, b.request_rate, b.seed))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"concurrency": b.concurrency, "request_rate": b.request_rate, **result}
    log.info("%s", result)
    out = record(result, cfg)
    plot(out, "output_tokens_per_s", "serving throughput (output tok/s)")
    return result["output_tokens_per_s"]


if __name__ == "__main__":
    main()
