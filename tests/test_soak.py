"""A small soak (experiments/soak.py): 64 streaming clients for a few seconds against a server whose KV pool
is too small for them all, with hang-ups and bad requests mixed in."""

from __future__ import annotations

import sys
from pathlib import Path

from live_server import MODEL, running_server
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from soak import soak  # noqa: E402


def test_soak_keeps_every_stream_exact_and_the_pool_whole(tiny_qwen3, tmp_path):
    # 40 pages of 16 tokens hold ~10 of the 64 clients' sequences: the rest queue or get preempted.
    with running_server(tiny_qwen3, tmp_path, "kv_cache.num_pages=40") as url:
        settings = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "soak.yaml").bench
        settings.update(clients=64, duration_s=5, max_requests=1000)
        result, failures = soak(url, MODEL, settings)
    assert failures == []  # streams equal their solo output, bad requests got 4xx bodies, pool idle, healthy
    assert result["completed"] >= 20 and result["disconnected"] > 0 and result["bad_requests"] > 0, result
    assert result["mismatches"] == 0 and result["prompts_checked"] >= 10, result
    assert result["preemptions"] > 0, "the pool was meant to be too small for the load"


def test_soak_with_hostile_clients_keeps_every_stream_exact(tiny_qwen3, tmp_path):
    """10% of requests are hostile (issue #32): each is refused, and every well-formed stream still ends and
    equals its solo output."""
    with running_server(tiny_qwen3, tmp_path, "kv_cache.num_pages=40") as url:
        settings = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "soak.yaml").bench
        settings.update(clients=32, duration_s=5, max_requests=600, bad_request_fraction=0, hostile_fraction=0.1)
        result, failures = soak(url, MODEL, settings)
    assert failures == [], failures[:5]
    assert result["bad_requests"] > 0 and result["completed"] >= 10, result
    assert result["mismatches"] == 0, result
