"""Mixture-of-experts overhead: the decode step of a random Qwen3-MoE against a dense Qwen3 with the same
active parameters per token (a token's experts add up to the dense MLP's width), at each batch size.

    python experiments/moe_overhead.py

At batch 1 both read about the same weight bytes per step (the MoE reads only its token's experts), so the
ratio shows what routing and the gathered expert products cost; at 32 rows the MoE reads many experts while
the dense model reads one MLP, the price of 8x the parameters for the same compute. The vocabulary is kept
small (a large head would dominate both steps alike).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from engine import LLM
from engine.config import EngineConfig
from engine.models.source import engine_cache_dir

sys.path.insert(0, os.path.dirname(__file__))
from roofline import decode_step_ms  # noqa: E402
from workloads import copy_qwen3_tokenizer, record  # noqa: E402

log = logging.getLogger("moe_overhead")


def checkpoint(kind: str, b: DictConfig) -> Path:
    """A random `kind` ("moe" or "dense") checkpoint of the configured shape, built once in the engine cache."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = OmegaConf.to_container(b.shape)
    experts = (b.num_experts, b.num_experts_per_tok, b.moe_intermediate_size)
    path = engine_cache_dir() / f"random-{kind}-{'-'.join(str(v) for v in (*shape.values(), *experts))}"
    if (path / "config.json").is_file():
        return path
    n, k, width = experts
    common = dict(max_position_embeddings=4096, intermediate_size=k * width)
    torch.manual_seed(0)
    if kind == "moe":
        moe = dict(moe_intermediate_size=width, num_experts=n, num_experts_per_tok=k)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, **shape, **moe))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, **shape))
    model.save_pretrained(path, safe_serialization=True)
    copy_qwen3_tokenizer(path)
    return path


@hydra.main(config_path="../configs", config_name="moe_overhead", version_base=None)
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    steps: dict[str, dict[int, float]] = {}
    for kind in ("dense", "moe"):
        cfg.model.path = str(checkpoint(kind, b))
        llm = LLM(config=EngineConfig.from_dictconfig(cfg))
        decode_step_ms(llm, 1, b.context_len, 4)  # warm-up / compile
        steps[kind] = {batch: decode_step_ms(llm, batch, b.context_len, b.steps) for batch in b.batch_sizes}
        llm.shutdown()
        del llm
    for batch in b.batch_sizes:
        dense, moe = steps["dense"][batch], steps["moe"][batch]
        log.info("batch %3d: dense %.2f ms/step, moe %.2f ms/step (%.2fx)", batch, dense, moe, moe / dense)
        record({"batch": batch, "dense_step_ms": dense, "moe_step_ms": moe, "moe_over_dense": moe / dense}, cfg)


if __name__ == "__main__":
    main()
