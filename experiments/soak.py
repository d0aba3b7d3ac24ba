"""Soak test of the real server: many concurrent streaming clients for a while, some hanging up mid-stream,
some sending bad requests, some hostile ones (n=100000, 200,000 logit_bias entries, 10,000 stop strings,
100,000 nested brackets); then checks that nothing broke.

    python experiments/soak.py                                         # 200 clients for 60 s
    python experiments/soak.py bench.clients=64 bench.duration_s=10 kv_cache.num_pages=64

Afterwards every stream that completed must equal its prompt's greedy output generated alone (so no
tokens leaked between clients, and preemption under KV pressure recomputed exactly), every bad request must
have been answered 4xx with OpenAI's error body, the KV pool must be back to full and the engine healthy.
Reports p50/p99 time to first token and inter-token latency. Loopback only, bounded in time and count;
exits non-zero when a check fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(__file__))
from serving_benchmark import percentiles, start_server  # noqa: E402
from workloads import record, resolve_bench_model, word_prompt  # noqa: E402

log = logging.getLogger("soak")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report

# (body, expected status) of requests that must be refused cleanly
BAD_REQUESTS = [
    ({"prompt": "hi", "max_tokens": -1}, 400),
    ({"prompt": "hi", "temperature": "hot"}, 400),
    ({"prompt": [[1, 2], "x"]}, 400),
    ({"prompt": "hi", "model": "no-such-model"}, 404),
    ({"prompt": "word " * 20000}, 400),  # longer than any context here
    ("{not json", 400),
]


def hostile_requests() -> list[tuple[str, int]]:
    """Requests built to hold the engine or break the parser (issue #32), each refused at once with a 400."""
    return [
        (json.dumps({"prompt": "hi", "n": 100000}), 400),
        (json.dumps({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(200000)}}), 400),
        (json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(10000)]}), 400),
        ("[" * 100000, 400),
    ]


@dataclass
class SoakReport:
    completed: int = 0
    disconnected: int = 0
    bad_requests: int = 0
    failures: list[str] = field(default_factory=list)  # what went wrong, one line each
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    outputs: dict[int, set[str]] = field(default_factory=dict)  # prompt index -> texts its completed streams got

    def summary(self) -> dict[str, float | int]:
        return {
            "completed": self.completed,
            "disconnected": self.disconnected,
            "bad_requests": self.bad_requests,
            "failures": len(self.failures),
            **{f"ttft_{k}_ms": v for k, v in percentiles(self.ttft).items() if k in ("p50", "p99")},
            **{f"itl_{k}_ms": v for k, v in percentiles(self.itl).items() if k in ("p50", "p99")},
        }


def prompt_pool(count: int, input_len: list[int], output_len: list[int], seed: int) -> list[tuple[str, int]]:
    """Distinct prompts (plain words, so any tokenizer handles them) with their output lengths."""
    rng = random.Random(seed)
    return [(word_prompt(rng, rng.randint(*input_len)), rng.randint(*output_len)) for _ in range(count)]


async def _stream(
    http: httpx.AsyncClient,
    model: str,
    prompt: str,
    max_tokens: int,
    hang_up_after: int | None,
    report: SoakReport,
    index: int,
) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = last = time.perf_counter()
    pieces: list[str] = []
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            report.failures.append(f"stream answered {r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                report.failures.append(f"stream ended with an error: {chunk['error']['message']}")
                return
            now = time.perf_counter()
            (report.ttft if not pieces else report.itl).append(now - (start if not pieces else last))
            last = now
            pieces.append(chunk["choices"][0]["text"])
            if hang_up_after is not None and len(pieces) >= hang_up_after:
                report.disconnected += 1
                return  # leaving the block closes the connection mid-stream
    report.completed += 1
    report.outputs.setdefault(index, set()).add("".join(pieces))


async def _bad_request(
    http: httpx.AsyncClient, rng: random.Random, report: SoakReport, choices: list[tuple[str, int]]
) -> None:
    content, status = rng.choice(choices)
    r = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != status or set(error) != {"message", "type", "param", "code"}:
        report.failures.append(f"bad request {content[:60]!r} answered {r.status_code}: {r.text[:200]}")
    report.bad_requests += 1


async def run_clients(
    url: str,
    model: str,
    prompts: list[tuple[str, int]],
    clients: int,
    duration_s: float,
    max_requests: int,
    disconnect_fraction: float,
    bad_fraction: float,
    hostile_fraction: float,
    seed: int,
) -> SoakReport:
    """`clients` concurrent loops of requests until `duration_s` or `max_requests` is reached."""
    report = SoakReport()
    bad = [(body if isinstance(body, str) else json.dumps(body), status) for body, status in BAD_REQUESTS]
    hostile = hostile_requests() if hostile_fraction else []
    deadline = time.perf_counter() + duration_s
    sent = 0
    # Idle connections expire before uvicorn's keep-alive timeout (5 s) closes them: httpx's default expiry is
    # the same 5 s, and a request sent on a connection the server was closing ended in a ReadError.
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def client(k: int) -> None:
            nonlocal sent
            rng = random.Random(seed * 100_003 + k)
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                try:
                    draw = rng.random()
                    if draw < bad_fraction + hostile_fraction:
                        await _bad_request(http, rng, report, bad if draw < bad_fraction else hostile)
                        continue
                    index = rng.randrange(len(prompts))
                    prompt, max_tokens = prompts[index]
                    hang_up = rng.randint(1, max(1, max_tokens - 1)) if rng.random() < disconnect_fraction else None
                    await _stream(http, model, prompt, max_tokens, hang_up, report, index)
                except httpx.HTTPError as e:
                    report.failures.append(f"client {k}: {type(e).__name__}: {e}")

        await asyncio.gather(*(client(k) for k in range(clients)))
    return report


def check_after(url: str, model: str, prompts: list[tuple[str, int]], report: SoakReport) -> dict[str, int]:
    """Idle pool, health, and every completed stream against its prompt's output generated alone."""
    deadline = time.time() + 60
    while time.time() < deadline:
        metrics = {
            line.split()[0]: float(line.split()[1])
            for line in httpx.get(f"{url}/metrics").text.splitlines()
            if line.startswith("engine_") and " " in line
        }
        if (
            metrics["engine_requests_running"]
            == metrics["engine_requests_waiting"]
            == metrics["engine_kv_pages_used"]
            == 0
        ):
            break
        time.sleep(0.5)
    else:
        report.failures.append(f"engine not idle after the load: {metrics}")
    if httpx.get(f"{url}/health").json().get("status") != "ok":
        report.failures.append("engine unhealthy after the load")
    mismatches = 0
    for index, texts in sorted(report.outputs.items()):
        prompt, max_tokens = prompts[index]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        if r.status_code != 200:
            report.failures.append(f"prompt {index} alone answered {r.status_code}: {r.text[:200]}")
            continue
        alone = r.json()["choices"][0]["text"]
        if texts != {alone}:
            mismatches += 1
            report.failures.append(f"prompt {index}: streams got {sorted(texts)!r:.400}, alone it is {alone!r:.200}")
    return {
        "prompts_checked": len(report.outputs),
        "mismatches": mismatches,
        "preemptions": int(metrics.get("engine_preemptions", 0)),
    }


def soak(url: str, model: str, b: DictConfig) -> tuple[dict, list[str]]:
    prompts = prompt_pool(b.distinct_prompts, list(b.input_len), list(b.output_len), b.seed)
    t0 = time.perf_counter()
    report = asyncio.run(
        run_clients(
            url,
            model,
            prompts,
            b.clients,
            b.duration_s,
            b.max_requests,
            b.disconnect_fraction,
            b.bad_request_fraction,
            b.hostile_fraction,
            b.seed,
        )
    )
    load_s = time.perf_counter() - t0
    checks = check_after(url, model, prompts, report)
    return {"clients": b.clients, "load_s": load_s, **report.summary(), **checks}, report.failures


@hydra.main(config_path="../configs", config_name="soak", version_base=None)
def main(cfg: DictConfig) -> None:
    resolve_bench_model(cfg)
    b = cfg.bench
    proc, url = (None, b.url) if b.url else start_server(cfg, warmup=None)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        log.info("soak: %d clients for %s s against %s", b.clients, b.duration_s, url)
        result, failures = soak(url, model, b)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    for line in failures[:20]:
        log.error("%s", line)
    log.info("%s", ", ".join(f"{k} {v}" for k, v in result.items()))
    out = record(result, cfg)
    log.info("results in %s", out)
    if failures:
        sys.exit(f"soak failed: {len(failures)} problem(s)")


if __name__ == "__main__":
    main()
