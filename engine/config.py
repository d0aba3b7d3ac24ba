"""The engine's configuration: Hydra composes it, `EngineConfig` types and validates it once.

Hydra stays at the edges (`server.py`, `experiments/`, `LLM(**overrides)`): each of them turns its
DictConfig into an `EngineConfig` with `EngineConfig.from_dictconfig`, and everything below them
(`LLMEngine`, `ModelRunner`, the tensor-parallel ranks, the HTTP server) receives these frozen
dataclasses. A bad value fails here, naming its key, before any model is loaded.

No torch import at module level: the HTTP process builds its config before it spawns the engine and
never needs torch itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from engine.limits import RequestLimits

if TYPE_CHECKING:
    import torch

    from engine.kernels.paged import PagedAttentionBase
    from engine.policies.base import AdmissionPolicy
    from engine.prefix_cache import PrefixCache
    from engine.quant.base import QuantScheme
    from engine.spec.base import Proposer

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "attention", "cache", "scheduler", "quant", "spec")
DTYPES = ("float32", "bfloat16", "float16")
# Short keyword names for the settings people change most (vLLM's names where it has one).
ALIASES = {
    "page_size": "kv_cache.page_size",
    "num_pages": "kv_cache.num_pages",
    "kv_memory_mb": "kv_cache.memory_mb",
    "max_num_batched_tokens": "scheduler.max_num_batched_tokens",
    "max_running_requests": "scheduler.max_running_requests",
    "max_num_seqs": "scheduler.max_running_requests",
    "max_model_len": "model.max_model_len",
    "served_model_name": "model.served_model_name",
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"invalid {key}={value!r}: {why}")
        self.key = key


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(key, value, why)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Component(Generic[T]):
    """One choice of a swappable part: the class a config group's YAML targets, and its arguments.

    `build(**runtime)` constructs it with the objects only the engine has (the KV pool, the allocator).
    """

    group: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A missing module fails now, not after the model has loaded; finding it does not import it (the
        # HTTP process would otherwise import torch through the attention backend).
        module = self.target.rpartition(".")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        _require(found, f"{self.group}._target_", self.target, f"no module named {module!r}")

    def resolve(self) -> type[T]:
        module, _, name = self.target.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except AttributeError:
            raise ConfigError(f"{self.group}._target_", self.target, f"{module} has no {name}") from None

    def build(self, **runtime: Any) -> T:
        return self.resolve()(**self.kwargs, **runtime)

    @property
    def name(self) -> str:
        return self.target.rpartition(".")[2]


@dataclass(frozen=True)
class ModelSettings:
    path: str | None = None  # None: the embedded SmolLM2
    served_model_name: str | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        n = self.max_model_len
        _require(n is None or (_is_int(n) and n >= 2), "model.max_model_len", n, "must be null or an integer >= 2")


@dataclass(frozen=True)
class KVCacheConfig:
    page_size: int = 16  # tokens per page
    memory_mb: float = 512  # pool budget, all layers, K and V
    num_pages: int | None = None  # overrides memory_mb
    # Sliding-window layers beside full ones keep only their window's pages (engine/kv_cache.py); false: every
    # layer keeps every page.
    window_pages: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.window_pages, bool), "kv_cache.window_pages", self.window_pages, "must be true or false"
        )
        _require(_is_int(self.page_size) and self.page_size >= 1, "kv_cache.page_size", self.page_size, "must be >= 1")
        mb = self.memory_mb
        _require(isinstance(mb, (int, float)) and mb > 0, "kv_cache.memory_mb", mb, "must be a positive number")
        n = self.num_pages
        _require(
            n is None or (_is_int(n) and n >= 2),
            "kv_cache.num_pages",
            n,
            "must be null or at least 2 (page 0 is scratch)",
        )


@dataclass(frozen=True)
class CompileConfig:
    enabled: bool = True
    mode: str = "auto"  # auto, or any torch.compile mode name
    cpu: Mapping[str, Any] = field(default_factory=dict)  # inductor options for mode=auto on CPU
    prefill: bool = True
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    warmup: str = "lazy"  # lazy | background
    # Compile one decoder layer and reuse its code for every layer (None: on CPU unless weights are frozen;
    # see configs/config.yaml).
    regional: bool | None = None
    # On CUDA: decode steps replay CUDA graphs captured at start-up, one per batch bucket (engine/cuda_graphs.py).
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_buckets", tuple(sorted(self.batch_buckets)))
        _require(self.warmup in ("lazy", "background"), "compile.warmup", self.warmup, "expected lazy or background")
        _require(
            bool(self.batch_buckets) and all(_is_int(b) and b >= 1 for b in self.batch_buckets),
            "compile.batch_buckets",
            list(self.batch_buckets),
            "must be a non-empty list of integers >= 1",
        )


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel ranks, one process each
    backend: str = "auto"  # auto (NCCL on CUDA, else gloo) | gloo | nccl
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (one node)
    nnodes: int = 1
    node_rank: int = 0
    timeout_s: float = 1800

    def __post_init__(self) -> None:
        _require(_is_int(self.tp) and self.tp >= 1, "parallel.tp", self.tp, "must be >= 1")
        _require(
            self.backend in ("auto", "gloo", "nccl"), "parallel.backend", self.backend, "expected auto, gloo or nccl"
        )
        _require(_is_int(self.nnodes) and self.nnodes >= 1, "parallel.nnodes", self.nnodes, "must be >= 1")
        _require(
            self.tp % self.nnodes == 0,
            "parallel.nnodes",
            self.nnodes,
            f"parallel.tp={self.tp} must divide evenly over the nodes",
        )
        _require(
            _is_int(self.node_rank) and 0 <= self.node_rank < self.nnodes,
            "parallel.node_rank",
            self.node_rank,
            f"must be in [0, {self.nnodes})",
        )
        _require(self.timeout_s > 0, "parallel.timeout_s", self.timeout_s, "must be positive")

    def ranks_of_node(self, node_rank: int) -> range:
        per_node = self.tp // self.nnodes
        return range(node_rank * per_node, (node_rank + 1) * per_node)


@dataclass(frozen=True)
class SchedulerConfig:
    policy: Component[AdmissionPolicy]  # admission order (engine/policies/)
    max_running_requests: int = 64
    max_num_batched_tokens: int = 512  # chunked-prefill token budget per step

    def __post_init__(self) -> None:
        for key in ("max_running_requests", "max_num_batched_tokens"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 1, f"scheduler.{key}", value, "must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    limits: RequestLimits = RequestLimits()  # also what the offline LLM applies to its requests

    def __post_init__(self) -> None:
        _require(_is_int(self.port) and 0 <= self.port < 65536, "server.port", self.port, "must be in [0, 65535]")
        if isinstance(self.limits, Mapping):
            object.__setattr__(self, "limits", RequestLimits(**self.limits))


# ------------------------------------------------------------------------------------------------ root


@dataclass(frozen=True)
class EngineConfig:
    model: ModelSettings
    attention: Component[PagedAttentionBase]
    cache: Component[PrefixCache]
    scheduler: SchedulerConfig
    quant: Component[QuantScheme]  # which layers get which weight format (engine/quant/)
    spec: Component[Proposer]  # speculative decoding's proposer (engine/spec/), NoSpeculation for none
    kv_cache: KVCacheConfig = KVCacheConfig()
    compile: CompileConfig = CompileConfig()
    parallel: ParallelConfig = ParallelConfig()
    server: ServerConfig = ServerConfig()
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; `torch_dtype` resolves it
    device: str = "cpu"
    seed: int = 0
    progress_bar: bool = True
    batch_invariant: bool = False  # kernels/row_invariant.py
    overlap: bool = False  # schedule step N+1 while step N runs (engine/overlap.py)

    def __post_init__(self) -> None:
        _require(
            self.dtype == "auto" or self.dtype in DTYPES, "dtype", self.dtype, f"expected auto or one of {list(DTYPES)}"
        )
        _require(self.device.split(":")[0] in ("cpu", "cuda"), "device", self.device, "expected cpu or cuda")
        _require(_is_int(self.seed), "seed", self.seed, "must be an integer")
        # A Uniform scheme (configs/quant/int8.yaml, int4.yaml) quantizes every layer with CPU kernels that are
        # not sharded; `auto` loads float weights where they cannot run (its `for_placement`).
        uniform = self.quant.name == "Uniform"
        _require(
            self.parallel.tp == 1 or not uniform,
            "quant",
            self.quant.kwargs.get("format"),
            f"quantized layers are not sharded: with parallel.tp={self.parallel.tp} use quant=none "
            "(or auto, which loads float weights there)",
        )
        _require(
            not self.device.startswith("cuda") or not uniform,
            "quant",
            self.quant.kwargs.get("format"),
            "the quantized kernels are written for the CPU: on a GPU use quant=none (or auto, which loads float "
            "weights there)",
        )

        _require(
            isinstance(self.batch_invariant, bool), "batch_invariant", self.batch_invariant, "must be true or false"
        )
        _require(
            not self.batch_invariant or (self.device == "cpu" and self.parallel.tp == 1),
            "batch_invariant",
            self.batch_invariant,
            f"is built for one CPU process (device={self.device}, parallel.tp={self.parallel.tp})",
        )
        _require(
            not self.batch_invariant or self.attention.resolve().batch_invariant,
            "batch_invariant",
            self.batch_invariant,
            f"needs attention=sdpa: {self.attention.name} attends a step's rows in calls that depend on the batch",
        )

        _require(isinstance(self.overlap, bool), "overlap", self.overlap, "must be true or false")
        _require(
            not self.overlap or self.spec.name == "NoSpeculation",
            "overlap",
            self.overlap,
            f"schedules a step before the last one's tokens are known, and speculative decoding ({self.spec.name}) "
            "drafts from them: use spec=none",
        )
        _require(
            not self.overlap or self.parallel.tp == 1,
            "overlap",
            self.overlap,
            f"is built for one rank: with parallel.tp={self.parallel.tp} each step's plan goes to the other ranks as "
            "host data, which would read the step before's tokens before this one launches",
        )

        _check_spec(self.spec.kwargs)
        if self.spec.name == "DraftProposer":
            path = (self.spec.kwargs.get("model") or {}).get("path")
            _require(path is not None, "spec.model.path", path, "spec=draft needs the draft model's path")
            _require(
                self.parallel.tp == 1,
                "spec",
                "draft",
                f"the draft model runs in one process: with parallel.tp={self.parallel.tp} use spec=ngram or none",
            )
            mb = self.spec.kwargs.get("memory_mb", 64)
            _require(isinstance(mb, (int, float)) and mb > 0, "spec.memory_mb", mb, "must be a positive number")
            quant = self.spec.kwargs.get("quant")
            choices = group_choices("quant")
            _require(quant is None or quant in choices, "spec.quant", quant, f"expected null or one of {choices}")
            sample = self.spec.kwargs.get("sample_drafts", True)
            _require(isinstance(sample, bool), "spec.sample_drafts", sample, "must be true or false")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.device)

    def replace(self, **sections: Any) -> EngineConfig:
        return dataclasses.replace(self, **sections)

    @classmethod
    def from_dictconfig(cls, cfg: DictConfig) -> EngineConfig:
        """Type a composed Hydra config (extra top-level keys, such as an experiment's `bench`, are ignored)."""
        raw = OmegaConf.to_container(cfg, resolve=True)
        scheduler = dict(raw["scheduler"])
        policy = scheduler.pop("policy")
        _require(
            isinstance(policy, dict) and "_target_" in policy,
            "scheduler.policy",
            policy,
            "must be a node with a _target_ (see configs/scheduler/)",
        )
        model = {k: v for k, v in raw["model"].items() if k in {f.name for f in dataclasses.fields(ModelSettings)}}
        return cls(
            model=ModelSettings(**model),
            attention=_component("attention", _attention_for_device(raw["attention"], raw["device"])),
            cache=_component("cache", raw["cache"]),
            scheduler=SchedulerConfig(policy=_component("scheduler.policy", policy), **scheduler),
            kv_cache=KVCacheConfig(**raw["kv_cache"]),
            compile=CompileConfig(**raw["compile"]),
            parallel=ParallelConfig(**raw["parallel"]),
            server=ServerConfig(**raw["server"]),
            quant=_component("quant", raw["quant"]),
            spec=_component("spec", raw["spec"]),
            **{k: raw[k] for k in ("dtype", "device", "seed", "progress_bar", "batch_invariant", "overlap")},
        )


def _check_spec(kwargs: Mapping[str, Any]) -> None:
    """The settings every proposer shares (engine/spec/base.py)."""
    k = kwargs.get("num_tokens", 1)
    _require(_is_int(k) and k >= 1, "spec.num_tokens", k, "must be an integer >= 1")
    low = kwargs.get("min_acceptance", 0)
    _require(isinstance(low, (int, float)) and 0 <= low < 1, "spec.min_acceptance", low, "must be in [0, 1)")
    lo, hi = kwargs.get("min_ngram", 1), kwargs.get("max_ngram", 1)
    _require(_is_int(lo) and _is_int(hi) and 1 <= lo <= hi, "spec.min_ngram", lo, f"needs 1 <= it <= max_ngram={hi}")


def _attention_for_device(node: dict[str, Any], device: str) -> dict[str, Any]:
    """`attention=auto` (configs/attention/auto.yaml) names a backend per device type."""
    if node.get("_target_") != "auto":
        return node
    kind = str(device).split(":")[0]
    return {"_target_": node.get(kind, node["cpu"])}  # an unknown device is refused with its own key


def quant_choice(name: str) -> Component:
    """configs/quant/<name>.yaml as a component (a draft model's own `spec.quant`)."""
    return _component("quant", OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "quant" / f"{name}.yaml")))


def _component(group: str, node: dict[str, Any]) -> Component:
    # `_partial_` is how the YAML files are written for Hydra's own instantiate; Component is always partial.
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "_partial_")}
    return Component(group, node["_target_"], kwargs)


def parse_dtype(value: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes in it (GPUs, CPUs with AVX-512 BF16 / AMX) and
    float32 elsewhere: emulated bf16 GEMMs measured slower than fp32 from batch 4 on an AVX2 CPU, and
    bf16 prefill 4x slower."""
    import torch  # here, not at the top: see the module docstring

    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    _require(name in DTYPES, "dtype", value, f"expected auto or one of {list(DTYPES)}")
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------- composing


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(model_path: str | Path | None = None, dtype: Any = None, **overrides: Any) -> EngineConfig:
    """The root config with `overrides` applied, typed.

    A keyword naming a config group (`scheduler="lpm"`) picks that group's file; dotted keys
    (`**{"compile.enabled": False}`), the aliases above, `enforce_eager=True`, and top-level keys set
    values; a dict value merges into that subtree (`compile={"enabled": False}`).
    """
    return EngineConfig.from_dictconfig(compose_dictconfig(model_path, dtype, **overrides))


def compose_dictconfig(model_path: str | Path | None = None, dtype: Any = None, **overrides: Any) -> DictConfig:
    """`compose_config` before typing (what Hydra apps get from `@hydra.main`)."""
    choices = []
    for group in GROUPS:
        if isinstance(overrides.get(group), str):
            choice = overrides.pop(group)
            if choice not in group_choices(group):
                raise ValueError(f"invalid {group}={choice!r}: expected one of {group_choices(group)}")
            choices.append(f"{group}={choice}")
    cfg = _compose(choices)
    with open_dict(cfg):
        if model_path is not None:
            cfg.model.path = str(model_path)
        if dtype is not None:
            cfg.dtype = str(dtype).removeprefix("torch.")
        if "enforce_eager" in overrides:
            cfg.compile.enabled = not overrides.pop("enforce_eager")
    for key, value in overrides.items():
        _set(cfg, key, value)
    return cfg


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    path = ALIASES.get(key, key)
    head = path.split(".")[0]
    if OmegaConf.select(cfg, path, default="__missing__") == "__missing__" and head not in GROUPS:
        raise ValueError(
            f"unknown option {key!r}: not a config key, group ({', '.join(GROUPS)}) "
            f"or alias ({', '.join(sorted(ALIASES))})"
        )
    if isinstance(value, dict):
        node = OmegaConf.select(cfg, path)
        with open_dict(node):
            node.merge_with(value)
    else:
        OmegaConf.update(cfg, path, value, force_add=True)


def compose_overrides(overrides: list[str]) -> EngineConfig:
    """The typed root config with Hydra command-line style overrides (`group=choice`, `a.b=value`)."""
    return EngineConfig.from_dictconfig(_compose(overrides))


def _compose(choices: list[str]) -> DictConfig:
    # Hydra keeps one global instance; an enclosing Hydra app (a sweep) must get its own back.
    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(config_name="config", overrides=choices)
    finally:
        gh.clear()
        if outer is not None:
            gh.initialize(outer)
