"""Compose the Hydra config for the Python API, so `LLM(**overrides)` and `server.py key=value` agree."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "attention", "cache", "scheduler")
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


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(model_path: str | Path | None = None, dtype: torch.dtype | str | None = None,
                   **overrides: Any) -> DictConfig:
    """The root config with `overrides` applied.

    A keyword naming a config group (`scheduler="lpm"`) picks that group's file; dotted keys
    (`**{"compile.enabled": False}`), the aliases above, `enforce_eager=True`, and top-level keys set
    values; a dict value merges into that subtree (`compile={"enabled": False}`).
    """
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
        path = ALIASES.get(key, key)
        head = path.split(".")[0]
        if OmegaConf.select(cfg, path, default="__missing__") == "__missing__" and head not in GROUPS:
            raise ValueError(f"unknown option {key!r}: not a config key, group ({', '.join(GROUPS)}) "
                             f"or alias ({', '.join(sorted(ALIASES))})")
        if isinstance(value, dict):
            node = OmegaConf.select(cfg, path)
            with open_dict(node):
                node.merge_with(value)
        else:
            OmegaConf.update(cfg, path, value, force_add=True)
    return cfg


def compose_overrides(overrides: list[str]) -> DictConfig:
    """The root config with Hydra command-line style overrides (`group=choice`, `a.b=value`)."""
    return _compose(overrides)


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
