"""What batch-invariant mode (`batch_invariant=true`, kernels/row_invariant.py) costs, and what it buys, on one
model: prefill of one long prompt, batch-1 decode, `bench.batch` sequences decoding together, and requests
arriving one step apart (prefill chunks beside decode rows) in tok/s, with and without the mode (two engines
in one process, measured in turns; medians of `bench.repeats` rounds); and
for `bench.check_prompts` prompts, how many greedy continuations are identical alone, all together, and
arriving one by one.

    python experiments/batch_invariance.py                      # SmolLM2, the default config
    python experiments/batch_invariance.py quant=none dtype=float32
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time

import hydra
from omegaconf import DictConfig

from engine import LLM, SamplingParams
from engine.config import EngineConfig

sys.path.insert(0, os.path.dirname(__file__))
from cpu_vs_llamacpp import FRESH, Rates, prompts, rates  # noqa: E402
from workloads import engine_generate, record, resolve_bench_model  # noqa: E402


def staggered(llm: LLM, batch: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Greedy continuations of `batch`, its requests submitted one engine step apart."""
    requests = []
    for p in batch:
        requests.append(llm._submit(None, p, params))
        llm._step()
    while not all(r.finished for r in requests):
        llm._step()
    return [r.output().outputs[0].token_ids for r in requests]


class Variant:
    """One engine (with or without the mode) and its measurements, taken in turns with the other's."""

    def __init__(self, cfg: DictConfig, mode: str) -> None:
        t = time.perf_counter()
        self.cfg, self.b = cfg, cfg.bench
        self.llm = LLM(config=EngineConfig.from_dictconfig(cfg))
        self.vocab = self.llm.engine.model_config.vocab_size
        self.rounds: list[Rates] = []
        self.measure()  # warm-up: compiles the decode graphs (and the prefill graph)
        self.rounds.clear()
        # Named after the setting measured: experiments/overlap.py shares this code.
        logging.getLogger(mode).info("%s=%s: started and warmed up in %.0f s", mode, cfg[mode], time.perf_counter() - t)

    def run(self, batch: list[list[int]], new: int) -> None:
        engine_generate(self.llm, [(p, new) for p in batch])

    def arriving(self) -> float:
        b = self.b
        batch = prompts(b.arrivals, b.arrival_prompt_tokens, self.vocab, next(FRESH))
        params = SamplingParams(max_tokens=b.new_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        staggered(self.llm, batch, params)
        return b.arrivals * b.new_tokens / (time.perf_counter() - start)

    def measure(self) -> None:
        self.rounds.append(rates(self.run, self.b, self.vocab) | {"arriving_tok_s": self.arriving()})

    def result(self) -> Rates:
        """Medians over the rounds, and how many greedy continuations match the prompt's alone."""
        out = {k: statistics.median(r[k] for r in self.rounds) for k in self.rounds[0]}
        b, llm = self.b, self.llm
        check = prompts(b.check_prompts, b.prompt_tokens, self.vocab, next(FRESH))
        params = SamplingParams(max_tokens=b.check_tokens, temperature=0, ignore_eos=True)
        alone = [llm.generate_outputs([p], params)[0].outputs[0].token_ids for p in check]
        together = [o.outputs[0].token_ids for o in llm.generate_outputs(check, params)]
        out["identical_together"] = float(sum(a == t for a, t in zip(alone, together)))
        out["identical_arriving"] = float(sum(a == t for a, t in zip(alone, staggered(llm, check, params))))
        return out


def compare(cfg: DictConfig, mode: str) -> None:
    """The default and the boolean setting `mode` turned on: both engines up, measured in turns (this machine
    drifts by minutes); one result row each, with the on/off ratios."""
    resolve_bench_model(cfg)
    variants = {}
    for on in (False, True):
        cfg[mode] = on
        variants[on] = Variant(cfg.copy(), mode)
    for _ in range(cfg.bench.repeats):
        for variant in variants.values():
            variant.measure()
    results = {on: variant.result() for on, variant in variants.items()}
    for on, r in results.items():
        cfg[mode] = on
        ratios = {f"{k}_vs_default": v / results[False][k] for k, v in r.items() if k.endswith("tok_s")}
        record({"label": f"{mode}={on}", **r, **ratios}, cfg)
        logging.getLogger(mode).info(
            "%s=%-5s %s",
            mode,
            on,
            "  ".join(
                f"{k} {v:.1f}" + (f" ({ratios[k + '_vs_default']:.2f}x)" if on else "")
                if k.endswith("tok_s")
                else f"{k} {v:.0f}/{cfg.bench.check_prompts}"
                for k, v in r.items()
            ),
        )


@hydra.main(config_path="../configs", config_name="batch_invariance", version_base=None)
def main(cfg: DictConfig) -> None:
    compare(cfg, "batch_invariant")


if __name__ == "__main__":
    main()
