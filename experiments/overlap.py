"""What overlap scheduling (`overlap=true`, engine/overlap.py) buys on this machine: prefill of one long prompt,
batch-1 decode, `bench.batch` sequences decoding together, and requests arriving one engine step apart, in tok/s,
with and without it (two engines in one process, measured in turns; medians of `bench.repeats` rounds); and for
`bench.check_prompts` prompts, how many greedy continuations are identical alone, all together, and arriving one
by one. The measurements and their workload are experiments/batch_invariance.py's.

    python experiments/overlap.py                      # SmolLM2, the default config
    python experiments/overlap.py quant=none dtype=float32
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(__file__))
from batch_invariance import compare  # noqa: E402


@hydra.main(config_path="../configs", config_name="overlap", version_base=None)
def main(cfg: DictConfig) -> None:
    compare(cfg, "overlap")


if __name__ == "__main__":
    main()
