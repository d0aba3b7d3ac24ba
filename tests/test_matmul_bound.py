"""The matmul bound (experiments/matmul_bound.py) must time the matmuls the model really runs."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from matmul_bound import linear_shapes, matmul_seconds  # noqa: E402

from engine.models.transformer import CausalLM, ModelConfig  # noqa: E402
from engine.parallel import TPGroup  # noqa: E402

CONFIG = ModelConfig(
    architecture="qwen3",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    qk_norm=True,
)


def test_linear_shapes_are_the_models_linear_layers():
    with torch.device("meta"):
        model = CausalLM(CONFIG, backend=None, tp=TPGroup())
    layers = sorted(
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    )
    assert sorted(linear_shapes(CONFIG)) == layers


def test_roofline_bound_is_below_the_measured_matmul_time():
    steps = Counter({(32, 2): 3, (4, 4): 5})
    measured, best_gflops, bound = matmul_seconds(CONFIG, torch.float32, "cpu", steps, repeats=2, bandwidth_gbs=1e6)
    # With bandwidth out of the way every step runs at the best rate any step reached: never slower.
    assert 0 < bound <= measured
    assert best_gflops > 0
