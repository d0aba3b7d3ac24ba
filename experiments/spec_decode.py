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

Decode rates exclude the prefill: (tokens - 1) / (time to all tokens - time to the first). The greedy outputs of
every spec choice are compared with spec=none's and the count of identical ones is reported.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

import hydra
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


def decode_rate(run: Run, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    """Median decode tok/s of `run` over all prompts at once, and the outputs."""

    def once() -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        run(prompts, 1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        outs = run(prompts, new_tokens)
        total = time.perf_counter() - t
        return sum(len(o) - 1 for o in outs) / max(total - first, 1e-9), outs

    measured = [once() for _ in range(repeats)]
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


def engine_config(cfg: DictConfig, spec: str) -> EngineConfig:
    cfg = cfg.copy()
    # The command line's spec.* values apply to every choice.
    given = {k: v for k, v in OmegaConf.to_container(cfg.spec).items() if k != "_target_"}
    cfg.spec = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "spec" / f"{spec}.yaml"), given)
    return EngineConfig.from_dictconfig(cfg)


def prompt_sets(llm: LLM, b: DictConfig) -> dict[str, dict[int, list[list[int]]]]:
    """Per workload, the chat-templated prompts at batch 1 (the first) and at `bench.batch` (cycled)."""
    tok = llm.tokenizer
    sets = {}
    for name in b.workloads:
        ids = [encode_chat(tok, [{"role": "user", "content": text}]) for text in WORKLOADS[name]]
        sets[name] = {1: ids[:1], b.batch: [ids[i % len(ids)] for i in range(b.batch)]}
    return sets


@hydra.main(config_path="../configs", config_name="spec_decode", version_base=None)
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    resolve_bench_model(cfg)
    rows: list[dict] = []
    baseline: dict[tuple[str, int], tuple[float, list[list[int]]]] = {}
    sets = None
    for spec in b.specs:
        t = time.perf_counter()
        with LLM(config=engine_config(cfg, spec)) as llm:
            sets = sets or prompt_sets(llm, b)
            run = engine_run(llm, b.temperature)
            # Warm-up: the decode and prefill graphs, including the quantized layers' few-row variants a
            # shrinking batch passes through (compiling those inside a timed run cost it 30-45 s each).
            for name in b.workloads:
                for batch in sorted({1, min(3, b.batch), min(7, b.batch), b.batch}):
                    run((sets[name][b.batch] * batch)[:batch], 8)
            log.info("engine spec=%s: loaded and warmed up in %.0f s", spec, time.perf_counter() - t)
            for name in b.workloads:
                for batch, prompts in sets[name].items():
                    before = llm.engine.stats()
                    rate, outs = decode_rate(run, prompts, b.new_tokens, b.repeats)
                    after = llm.engine.stats()
                    proposed = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
                    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
                    base_rate, base_outs = baseline.setdefault((name, batch), (rate, outs))
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
        gc.collect()
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
