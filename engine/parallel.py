"""Tensor parallelism on torch.distributed: which heads / rows a rank owns, and the two collectives.

Column-parallel layers (QKV, gate/up) split their output rows; row-parallel ones (o_proj, down_proj)
split their input columns and all-reduce; the embedding and LM head split the vocabulary. KV heads are
split when there are at least as many as ranks, otherwise each rank keeps the one its query heads use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        # Functional collectives trace under torch.compile, unlike the in-place dist.all_reduce.
        return x if self.size == 1 else funcol.all_reduce(x, "sum", dist.group.WORLD)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        return funcol.all_gather_single(x.contiguous(), x.dim() - 1, dist.group.WORLD)


@dataclass(frozen=True)
class HeadShard:
    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int


def shard_heads(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadShard:
    if num_heads % tp:
        raise ValueError(f"invalid parallel.tp={tp}: the model's {num_heads} attention heads do not divide by it")
    if num_kv_heads % tp == 0:
        kv = num_kv_heads // tp
        return HeadShard(rank * num_heads // tp, num_heads // tp, rank * kv, kv)
    if tp % num_kv_heads == 0:  # fewer KV heads than ranks: replicate each over tp / num_kv_heads ranks
        return HeadShard(rank * num_heads // tp, num_heads // tp, rank // (tp // num_kv_heads), 1)
    raise ValueError(
        f"invalid parallel.tp={tp}: the model's {num_kv_heads} KV heads neither divide by it nor divide it"
    )


def check_divisible(intermediate_size: int, tp: int) -> None:
    if intermediate_size % tp:
        raise ValueError(f"invalid parallel.tp={tp}: the MLP width {intermediate_size} does not divide by it")


def vocab_shard(vocab_size: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, start + size) of the (padded) vocabulary this rank holds."""
    size = -(-vocab_size // tp)
    return rank * size, size


def init_distributed(rank: int, size: int, master_addr: str, master_port: int, backend: str, timeout_s: float) -> None:
    from datetime import timedelta

    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )
