"""Server start to first token: spawn `python server.py`, time until /health answers and until the first
streamed token of one chat request arrives (then, optionally, until the compiled decode graphs are in use).

    python experiments/server_startup.py                       # the default model, background compile
    python experiments/server_startup.py compile.warmup=lazy   # first token waits for compilation
"""

from __future__ import annotations

import logging
import os
import sys
import time

import httpx
import hydra
import openai
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(__file__))
from serving_benchmark import start_server  # noqa: E402
from workloads import record, resolve_bench_model  # noqa: E402

log = logging.getLogger("startup")


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@hydra.main(config_path="../configs", config_name="serving", version_base=None)
def main(cfg: DictConfig) -> float:
    resolve_bench_model(cfg)
    t0 = time.perf_counter()
    proc, url = start_server(cfg, warmup=None)
    healthy = time.perf_counter() - t0
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", timeout=900, max_retries=0)
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8, temperature=0, stream=True
        )
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
        result = {"healthy_s": healthy, "first_token_s": first}
        if cfg.bench.wait_for_compile and cfg.compile.enabled:
            # Stats reach /metrics with each step, so keep a trickle of requests going while waiting.
            while gauge(url, "engine_decode_compiled") < 1:
                client.completions.create(model=model, prompt="Hi", max_tokens=2)
                time.sleep(2)
            result["decode_compiled_s"] = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log.info("%s", result)
    record(result, cfg)
    return result["first_token_s"]


if __name__ == "__main__":
    main()
