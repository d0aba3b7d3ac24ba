"""Speculative decoding's speed-up: greedy decode tok/s with each `bench.specs` choice against spec=none, at
batch 1 and with `bench.batch` sequences, on two workloads: `copy` (the answer repeats much of the prompt:
a code block rewritten with one name changed, a passage quoted) and `chat` (free answers, where prompt lookup
rarely guesses right). In the same run, llama.cpp on the same GGUF file and prompts, plain and with its
prompt-lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding`), at batch 1.

    pip install llama-cpp-python
    python experiments/spec_decode.py
    python experiments/spec_decode.py bench.llama_cpp=false spec.num_tokens=8
    python experiments/spec_decode.py bench.specs=[none,draft] spec=draft spec.model.path=smollm2 \
        quant=none spec.quant=auto

The last: SmolLM2's float weights (the file's values) verified, its int4 copy as the draft; with
`bench.temperature=1` the requests sample (seeded per prompt), so the rates and acceptance are those of sampled
drafts (`spec.sample_drafts`) and the identical-output counts mean nothing.

Decode rates exclude the prefill: (tokens - 1) / (time to all tokens - time to the first). Every spec choice's
engine stays up and they are measured in turns, round after round (medians of `bench.repeats`). The greedy
outputs of every spec choice are compared with spec=none's and the count of identical ones is reported.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from engine import LLM, SamplingParams
from engine.config import CONFIG_DIR, EngineConfig
from engine.models.source import resolve_model
from engine.tokenizer import encode_chat

sys.path.insert(0, os.path.dirname(__file__))
from workloads import record, resolve_bench_model  # noqa: E402

log = logging.getLogger("spec_decode")

CODE = '''def compute_total(prices, tax_rate):
    """Sum the prices and add tax."""
    subtotal = 0
    for price in prices:
        if price < 0:
            raise ValueError("negative price")
        subtotal += price
    tax = subtotal * tax_rate
    return round(subtotal + tax, 2)


def cheapest(prices):
    return min(prices) if prices else None


print(compute_total([3.5, 2.25, 10], 0.08))
'''
PASSAGE = (
    "The lighthouse stood on a rock a mile from the shore. Every night its keeper climbed the hundred and twelve "
    "steps to light the lamp, and every morning he climbed them again to put it out. Ships passed it without "
    "knowing his name. In forty years he missed only one night, the night his daughter was born."
)
WORKLOADS = {
    "copy": [
        f"Rewrite this Python code with the function `compute_total` renamed to `sum_prices`. Output only the "
        f"code.\n\n```python\n{CODE}```",
        f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage word for word, then say in one sentence what it "
        "is about.",
    ],
    "chat": [
        "Tell me a short story about a lighthouse keeper.",
        "What are some tips for staying productive when working from home?",
    ],
}
Run = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, max new tokens) -> the outputs' tokens


def decode_once(run: Run, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s of `run` over all prompts at once (the time to the first token taken out), and the outputs."""
    t = time.perf_counter()
    run(prompts, 1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    outs = run(prompts, new_tokens)
    total = time.perf_counter() - t
    return sum(len(o) - 1 for o in outs) / max(total - first, 1e-9), outs


def decode_rate(run: Run, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    """Median of `repeats` `decode_once` rates, and the first outputs."""
    measured = [decode_once(run, prompts, new_tokens) for _ in range(repeats)]
    return statistics.median(r for r, _ in measured), measured[0][1]


class LlamaCpp:
    """llama-cpp-python's high-level API, one sequence at a time, with or without prompt lookup."""

    def __init__(self, path: str, b: DictConfig, lookup: bool) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=b.llama_cpp_draft_tokens) if lookup else None
        self.llm = llama_cpp.Llama(path, n_threads=b.threads, n_ctx=2048, draft_model=draft, verbose=False)

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        outs = []
        for p in prompts:
            self.llm.reset()  # no reuse of the previous call's prompt
            tokens = []
            for chunk in self.llm.generate(p, temp=0.0, top_k=1, reset=True):
                if self.llm.token_eos() == chunk:
                    break
                tokens.append(chunk)
                if len(tokens) == new_tokens:
                    break
            outs.append(tokens)
        return outs


def engine_run(llm: LLM, temperature: float) -> Run:
    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = [SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=i) for i in range(len(prompts))]
        outs = llm.generate_outputs(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    return run


def spec_file(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "spec" / f"{name}.yaml"))


def engine_config(cfg: DictConfig, spec: str) -> EngineConfig:
    cfg = cfg.copy()
    # The command line's spec.* values (those differing from the chosen group file's) apply to every choice.
    chosen = spec_file(HydraConfig.get().runtime.choices.spec)
    given = {k: v for k, v in OmegaConf.to_container(cfg.spec).items() if k != "_target_" and chosen.get(k) != v}
    cfg.spec = OmegaConf.merge(spec_file(spec), given)
    return EngineConfig.from_dictconfig(cfg)


def prompt_sets(llm: LLM, b: DictConfig) -> dict[str, dict[int, list[list[int]]]]:
    """Per workload, the chat-templated prompts at batch 1 (the first) and at `bench.batch` (cycled)."""
    tok = llm.tokenizer
    sets = {}
    for name in b.workloads:
        ids = [encode_chat(tok, [{"role": "user", "content": text}]) for text in WORKLOADS[name]]
        sets[name] = {1: ids[:1], b.batch: [ids[i % len(ids)] for i in range(b.batch)]}
    return sets


def warm_up(llm: LLM, sets: dict[str, dict[int, list[list[int]]]], b: DictConfig) -> None:
    """The decode and prefill graphs, including the quantized layers' few-row variants a shrinking batch passes
    through (compiling those inside a timed run cost it 30-45 s each)."""
    run = engine_run(llm, b.temperature)
    for name in b.workloads:
        for batch in sorted({1, min(3, b.batch), min(7, b.batch), b.batch}):
            run((sets[name][b.batch] * batch)[:batch], 8)


def measure_in_turns(engines: dict[str, LLM], sets: dict[str, dict[int, list[list[int]]]], b: DictConfig) -> list[dict]:
    """Every engine's rate on every workload and batch, in rounds that take each engine in turn (this machine's
    speed drifts by 20-30% over minutes: engines measured one after the other minutes apart differed by 1.36x on
    a workload where nothing was speculated); medians of `bench.repeats` rounds."""
    measured: dict[tuple[str, str, int], list[tuple[float, list[list[int]], int, int]]] = {}
    for _ in range(b.repeats):
        for name in b.workloads:
            for batch, prompts in sets[name].items():
                for spec, llm in engines.items():
                    before = llm.engine.stats()
                    rate, outs = decode_once(engine_run(llm, b.temperature), prompts, b.new_tokens)
                    after = llm.engine.stats()
                    counts = [after[k] - before[k] for k in ("spec_proposed_tokens", "spec_accepted_tokens")]
                    measured.setdefault((spec, name, batch), []).append((rate, outs, *counts))
    rows = []
    for (spec, name, batch), runs in measured.items():
        rate = statistics.median(r[0] for r in runs)
        base_rate = statistics.median(r[0] for r in measured[(b.specs[0], name, batch)])
        outs, base_outs = runs[0][1], measured[(b.specs[0], name, batch)][0][1]
        proposed, accepted = sum(r[2] for r in runs), sum(r[3] for r in runs)
        rows.append(
            {
                "label": f"engine spec={spec}",
                "workload": name,
                "batch": batch,
                "decode_tok_s": rate,
                "vs_spec_none": rate / base_rate,
                "identical_to_spec_none": sum(a == o for a, o in zip(base_outs, outs)),
                "sequences": len(outs),
                "mean_new_tokens": statistics.mean(len(o) for o in outs),
                "acceptance": accepted / proposed if proposed else 0.0,
            }
        )
        log.info("%s", rows[-1])
    return rows


@hydra.main(config_path="../configs", config_name="spec_decode", version_base=None)
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    resolve_bench_model(cfg)
    rows: list[dict] = []
    sets: dict[str, dict[int, list[list[int]]]] = {}
    with ExitStack() as stack:  # every engine stays up until all are measured
        engines = {}
        for spec in b.specs:
            t = time.perf_counter()
            engines[spec] = stack.enter_context(LLM(config=engine_config(cfg, spec)))
            sets = sets or prompt_sets(engines[spec], b)
            warm_up(engines[spec], sets, b)
            log.info("engine spec=%s: loaded and warmed up in %.0f s", spec, time.perf_counter() - t)
        rows += measure_in_turns(engines, sets, b)
    if b.llama_cpp:
        source = resolve_model(cfg.model.path)
        if not source.is_gguf:
            raise SystemExit(f"model.path={cfg.model.path}: llama.cpp needs a .gguf file (or bench.llama_cpp=false)")
        for lookup in (False, True):
            llama = LlamaCpp(str(source.path), b, lookup)
            for name in b.workloads:
                rate, _ = decode_rate(llama.run, sets[name][1], b.new_tokens, b.repeats)
                label = "llama.cpp prompt lookup" if lookup else "llama.cpp"
                rows.append({"label": label, "workload": name, "batch": 1, "decode_tok_s": rate})
                log.info("%s", rows[-1])
            del llama
    for row in rows:
        if row["batch"] == 1 and not row["label"].startswith("llama.cpp"):
            for key, label in (("vs_llama_cpp", "llama.cpp"), ("vs_llama_cpp_lookup", "llama.cpp prompt lookup")):
                other = [r for r in rows if r["label"] == label and r["workload"] == row["workload"]]
                if other:
                    row[key] = row["decode_tok_s"] / other[0]["decode_tok_s"]
        record(row, cfg)
    ratios = ("vs_spec_none", "vs_llama_cpp", "vs_llama_cpp_lookup", "acceptance")
    for row in rows:
        log.info(
            "%-26s %-5s batch %2d  %7.1f tok/s%s",
            row["label"],
            row["workload"],
            row["batch"],
            row["decode_tok_s"],
            "".join(f"  {k} {row[k]:.2f}" for k in ratios if k in row),
        )


if __name__ == "__main__":
    main()
