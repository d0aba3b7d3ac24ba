"""Replicas behind the SGLang model gateway (`sglang-router`): 1 vs 2 replicas, round_robin vs cache_aware, on a
prefix-sharing workload (several long system prompts, several questions each).

    python experiments/scale_out.py                                  # SmolLM2, eager, 2 replicas at most
    python experiments/scale_out.py bench.prefixes=6 bench.questions=8

Reports per run: throughput, TTFT p50/p99, the share of prompt tokens the replicas found in their prefix caches
(summed over their /metrics), and the gateway's added latency per request (the same small request sent through
the gateway and to a replica directly, alternating). On 2 cores two replicas share the CPU: what the numbers
show is the cache hits and the overhead, not more throughput.
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

sys.path.insert(0, os.path.dirname(__file__))
from serving_benchmark import percentiles  # noqa: E402
from workloads import WORDS, free_port, record, resolve_bench_model, wait_until_up  # noqa: E402

log = logging.getLogger("scale_out")
ROOT = Path(__file__).resolve().parent.parent


def start_router(workers: list[str], policy: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`python -m sglang_router.launch_router` in front of `workers`, once it lists the model. Its own
    Prometheus exporter gets a free port too (the default, 29000, is taken by a second router)."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--prometheus-port", str(free_port()), "--policy", policy, "--log-level", "warn",
           "--health-check-interval-secs", "2", "--worker-urls", *workers]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url, "the router", timeout, path="/v1/models")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prefix_requests(prefixes: int, questions: int, prefix_words: int, seed: int) -> list[tuple[str, str]]:
    """(system prompt, question) pairs: `prefixes` long system prompts, `questions` each, interleaved."""
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(prefix_words)) for _ in range(prefixes)]
    return [
        (systems[p], f"Question {q}: what is {rng.choice(WORDS)}?") for q in range(questions) for p in range(prefixes)
    ]


def metric_sum(urls: list[str], name: str) -> float:
    total = 0.0
    for url in urls:
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                total += float(line.split()[1])
    return total


def cached_share(urls: list[str], before: tuple[float, float]) -> float:
    """Prompt tokens found in the replicas' prefix caches since `before`, as a share of all prompt tokens."""
    cached, prompt = cache_counters(urls)
    return (cached - before[0]) / max(1.0, prompt - before[1])


def cache_counters(urls: list[str]) -> tuple[float, float]:
    return metric_sum(urls, "engine_prompt_tokens_cached_total"), metric_sum(urls, "engine_prompt_tokens_total")


async def run_requests(
    url: str, model: str, requests: list[tuple[str, str]], max_tokens: int, concurrency: int
) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", timeout=600, max_retries=0)
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(system: str, question: str) -> None:
        nonlocal tokens
        async with sem:
            start, first = time.perf_counter(), True
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                max_tokens=max_tokens, temperature=0, stream=True,
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    tokens += 1
                    if first:
                        ttfts.append(time.perf_counter() - start)
                        first = False

    t0 = time.perf_counter()
    async with client:  # closed inside the loop (left to the collector, it raised "Event loop is closed")
        await asyncio.gather(*(one(s, q) for s, q in requests))
    elapsed = time.perf_counter() - t0
    pct = percentiles(ttfts)
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": pct["p50"], "ttft_p99_ms": pct["p99"], "seconds": elapsed}


def gateway_overhead_ms(router: str, replica: str, model: str, rounds: int) -> float:
    """Median extra latency of a one-token completion through the gateway over the same sent to a replica."""
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    extra = []
    for _ in range(rounds):
        times = []
        for url in (replica, router):
            start = time.perf_counter()
            httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
            times.append(time.perf_counter() - start)
        extra.append((times[1] - times[0]) * 1000)
    return statistics.median(extra)


def start_replicas(cfg: DictConfig, count: int, run_dir: str) -> list[tuple[subprocess.Popen, str]]:
    replicas = []
    for i in range(count):
        port = free_port()
        overrides = [a for a in sys.argv[1:] if not a.startswith(("bench.", "hydra."))]
        # This experiment's own defaults (configs/scale_out.yaml) go to the replicas unless overridden.
        own = [f"compile.enabled={cfg.compile.enabled}", f"kv_cache.memory_mb={cfg.kv_cache.memory_mb}"]
        cmd = [
            sys.executable,
            "server.py",
            *own,
            *overrides,
            f"server.port={port}",
            f"hydra.run.dir={run_dir}/replica{i}",
        ]
        if cfg.model.path and not any(o.startswith("model.path=") for o in overrides):
            cmd.append(f"model.path={cfg.model.path}")
        # Replicas on one machine split its cores: each with all of them, two replicas' threads fought over two
        # cores (2 replicas, round robin: TTFT p99 29.6 s against 4.0 s for one replica).
        threads = str(max(1, (os.cpu_count() or 1) // count))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        replicas.append((proc, f"http://127.0.0.1:{port}"))
    for proc, url in replicas:
        wait_until_up(proc, url, "a replica", 600)
    return replicas


@hydra.main(config_path="../configs", config_name="scale_out", version_base=None)
def main(cfg: DictConfig) -> None:
    resolve_bench_model(cfg)
    b = cfg.bench
    run_dir = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    replicas = start_replicas(cfg, max(b.replicas), run_dir)
    urls = [url for _, url in replicas]
    model = httpx.get(f"{urls[0]}/v1/models").json()["data"][0]["id"]
    out = None
    try:
        for run, (count, policy) in enumerate((c, p) for c in b.replicas for p in b.policies):
            router, router_url = start_router(urls[:count], policy)
            try:
                requests = prefix_requests(b.prefixes, b.questions, b.prefix_words, seed=b.seed + run)
                before = cache_counters(urls[:count])
                result = asyncio.run(run_requests(router_url, model, requests, b.max_tokens, b.concurrency))
                result.update(
                    replicas=count,
                    policy=policy,
                    cached_share=cached_share(urls[:count], before),
                    gateway_overhead_ms=gateway_overhead_ms(router_url, urls[0], model, b.overhead_rounds),
                )
            finally:
                stop(router)
            log.info("%s", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
            out = record(result, cfg)
    finally:
        for proc, _ in replicas:
            stop(proc)
    log.info("results in %s", out)


if __name__ == "__main__":
    main()
