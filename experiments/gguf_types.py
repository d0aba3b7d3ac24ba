"""What each GGUF type becomes under `quant=auto`, and what that costs: one GGUF re-written per type, every
weight matrix in that type (a "pure" file, like `llama-quantize --pure`), then per file the weight error of
`auto`'s layers against the file's own values (`quant=none`) and the perplexity of both on
tests/data/perplexity.txt.

    python experiments/gguf_types.py                              # the embedded SmolLM2
    python experiments/gguf_types.py model.path=gemma-3-270m

The gguf library writes the types it can quantize (F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1); K-quants (Q6_K,
Q5_K, Q4_K, Q3_K, Q2_K) come from llama.cpp's quantizer when llama-cpp-python is installed and are left out
otherwise. A matrix whose row is not a whole number of the type's blocks keeps its type (gguf) or takes
llama.cpp's fallback (K-quants need rows of 256: SmolLM2's 576-wide rows fall back), so each result names the
file's types. The source file's values are the starting point, so a file never holds more than they do.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from engine import LLM
from engine.kernels.quant_linear import Int4Linear, Int8Embedding, Int8Linear, PackedInt4Linear
from engine.models.gguf_index import GGUFIndex
from engine.models.source import engine_cache_dir, resolve_model

sys.path.insert(0, os.path.dirname(__file__))
from gguf_files import quantize_with_llama_cpp, requantize_with_gguf  # noqa: E402
from workloads import engine_config, perplexity, record, resolve_bench_model  # noqa: E402

log = logging.getLogger("gguf_types")
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity.txt"
# llama.cpp file types whose matrices are all of one K-quant type when quantized with `pure`
LLAMA_CPP_TYPES = {"Q6_K": "Q6_K", "Q5_K": "Q5_K_S", "Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S", "Q2_K": "Q2_K"}


def typed_file(source: Path, qtype: str) -> Path | None:
    """The GGUF of `qtype` made from `source` (built once in the engine cache); None where nothing can write it."""
    out = engine_cache_dir() / "gguf-types" / f"{source.stem}-{qtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    if qtype in LLAMA_CPP_TYPES:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            log.warning("%s needs llama.cpp's quantizer (pip install llama-cpp-python): left out", qtype)
            return None
        quantize_with_llama_cpp(source, partial, LLAMA_CPP_TYPES[qtype], pure=True)
    else:
        requantize_with_gguf(source, partial, qtype)
    partial.rename(out)
    return out


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every linear layer's and embedding table's weight as float values, whatever its format."""
    weights = {}
    with torch.inference_mode():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                weights[name] = m.weight.float()
            elif isinstance(m, (Int4Linear, PackedInt4Linear, Int8Linear)):
                weights[name] = m.dequantized().float()
            elif isinstance(m, Int8Embedding):
                weights[name] = m(torch.arange(m.num_embeddings)).float()
    return weights


def weight_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max abs error, relative RMS error) over every weight `want` has."""
    worst, err2, ref2 = 0.0, 0.0, 0.0
    for name, w in want.items():
        d = got[name] - w
        worst = max(worst, d.abs().max().item())
        err2 += d.double().square().sum().item()
        ref2 += w.double().square().sum().item()
    return worst, math.sqrt(err2 / ref2)


def measure(cfg: DictConfig, path: Path, text: str) -> dict[str, float]:
    results, weights = {}, {}
    for mode in ("none", "auto"):
        cfg.model.path = str(path)
        llm = LLM(config=engine_config(cfg, mode))
        results[f"ppl_{mode}"] = perplexity(llm, text)
        weights[mode] = float_weights(llm.engine.model)
        llm.shutdown()
        del llm
    results["max_abs_err"], results["rel_rms_err"] = weight_error(weights["auto"], weights["none"])
    results["ppl_ratio"] = results["ppl_auto"] / results["ppl_none"]
    return results


def file_types(path: Path) -> str:
    """The file's matrix types, most common first (e.g. "Q6_K x30, Q8_0 x181")."""
    types = collections.Counter(t.tensor_type.name for t in GGUFIndex(path).tensors if len(t.shape) >= 2)
    return ", ".join(f"{name} x{n}" for name, n in types.most_common())


@hydra.main(config_path="../configs", config_name="gguf_types", version_base=None)
def main(cfg: DictConfig) -> None:
    resolve_bench_model(cfg)
    source = resolve_model(cfg.model.path)
    if not source.is_gguf:
        raise SystemExit(f"model.path={cfg.model.path}: needs a .gguf file to re-write per type")
    text = TEXT.read_text()
    for qtype in cfg.bench.types:
        path = typed_file(source.path, qtype)
        if path is None:
            continue
        result = {"type": qtype, "tensors": file_types(path), **measure(cfg, path, text)}
        log.info(
            "%-5s auto vs none: max abs %.2e, rel RMS %.2e, perplexity %.3f vs %.3f (%+.2f%%)  [%s]",
            qtype,
            result["max_abs_err"],
            result["rel_rms_err"],
            result["ppl_auto"],
            result["ppl_none"],
            100 * (result["ppl_ratio"] - 1),
            result["tensors"],
        )
        record(result, cfg)


if __name__ == "__main__":
    main()
