"""Tensor-parallel ranks > 0: one process each, executing the step plans rank 0 broadcasts.

On one machine rank 0 starts the others itself. For several machines, start the ranks of every other
node with this module, pointing at rank 0's node (the same overrides as the server or LLM):

    python -m engine.tp_worker parallel.tp=4 parallel.nnodes=2 parallel.node_rank=1 \
        parallel.master_addr=10.0.0.1 parallel.master_port=29500 model.path=/models/Qwen3-0.6B
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import torch
import torch.distributed as dist

from engine.config import EngineConfig, compose_overrides
from engine.lifecycle import exit_with_parent
from engine.model_runner import build_runner
from engine.models.loader import load_config
from engine.models.source import resolve_model
from engine.parallel import TPGroup, init_distributed


def worker_main(cfg: EngineConfig, rank: int, num_pages: int) -> None:
    exit_with_parent()  # a rank left behind by a dead rank 0 would sit in a collective until the timeout
    p = cfg.parallel
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.tp))
    init_distributed(rank, p.tp, p.master_addr, p.master_port, p.backend, p.timeout_s)
    source = resolve_model(cfg.model.path)
    runner, _ = build_runner(cfg, source, load_config(source), num_pages, TPGroup(rank, p.tp))
    try:
        runner.serve_rank()
    finally:
        dist.destroy_process_group()
    # As the engine process does (engine_process.py): interpreter finalisation with the process group's C++
    # threads still winding down aborted a rank at a server's SIGTERM ("terminate called without an active
    # exception", 1 of 323 tests in a CI run). Nothing is left to clean up, so leave without it; an exception
    # above still exits the normal way, with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def start_local_ranks(cfg: EngineConfig, ranks: range, num_pages: int) -> list[mp.Process]:
    ctx = mp.get_context("spawn")
    procs = []
    for rank in ranks:
        proc = ctx.Process(target=worker_main, args=(cfg, rank, num_pages), name=f"tp-rank-{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def main(argv: list[str]) -> None:
    cfg = compose_overrides(argv)
    if cfg.parallel.master_port is None or cfg.kv_cache.num_pages is None:
        sys.exit("error: other nodes need parallel.master_port and kv_cache.num_pages as rank 0 logged them")
    procs = start_local_ranks(cfg, cfg.parallel.ranks_of_node(cfg.parallel.node_rank), cfg.kv_cache.num_pages)
    for proc in procs:
        proc.join()
    sys.exit(max(p.exitcode or 0 for p in procs))


if __name__ == "__main__":
    main(sys.argv[1:])
