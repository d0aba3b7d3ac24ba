"""The GPU step's host-side structure, checked on CPU: no device read inside a step but the sampled tokens,
and decode steps through the CUDA-graph runner's static buffers (engine/cuda_graphs.py, which off a GPU
calls the same function on the same buffers instead of replaying a graph)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_greedy, trim_at_eos
from torch.utils._python_dispatch import TorchDispatchMode

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs, graph_buckets

# Ops that make the host wait for the device (on a GPU); counted by dispatch, so CPU runs see them too.
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops above, device-to-host copies, and the reads that bypass dispatch on CPU tensors
    (`tolist`, `numpy`), which on a GPU are device-to-host copies."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.inside_read = False  # a counted read's own copy (tolist on a GPU tensor) is not counted again

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        copy = name in ("aten._to_copy", "aten.copy_") and _device_to_host(func, args, kwargs or {})
        if not self.inside_read and (name in SYNC_OPS or copy):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patched = {}
        for method in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def counted(tensor, *a, _original=original, _method=method, **k):
                self.seen.append(_method)
                self.inside_read = True
                try:
                    return _original(tensor, *a, **k)
                finally:
                    self.inside_read = False

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


def _device_to_host(func, args, kwargs) -> bool:
    src = args[1] if func.__name__.startswith("copy_") else args[0]
    dst_device = kwargs.get("device") or (args[0].device if func.__name__.startswith("copy_") else None)
    return src.device.type != "cpu" and dst_device is not None and torch.device(dst_device).type == "cpu"


def test_a_step_reads_nothing_from_the_device_but_its_sampled_tokens(tiny_qwen3, qwen_tokenizer, device):
    llm = LLM(
        str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False, max_num_batched_tokens=24,
        device=device,
    )  # fmt: skip
    engine = llm.engine
    # Greedy and sampled rows (top-k, top-p, min-p), prompts chunked over several steps beside decode rows.
    params = [
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, ignore_eos=True, seed=3),
    ]
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_sequence(f"s{i}", qwen_tokenizer.encode(prompt) * 3, params[i % 2])
    kinds = set()
    while engine.has_unfinished():
        decode_only = engine.scheduler.running and not engine.scheduler.waiting
        with SyncCounter() as counter:
            outputs = engine.step()
        kinds.add("decode" if decode_only else "mixed")
        if outputs:
            assert counter.seen == ["tolist"], counter.seen  # the sampled tokens, once
        else:  # a step of prefill chunks that samples nothing
            assert counter.seen == [], counter.seen
    assert kinds == {"decode", "mixed"}


def decode_graphs_for(llm: LLM, compiled: bool) -> DecodeGraphs:
    runner = llm.engine.runner
    fn = runner.graphs.decode if compiled else runner._logits_at_every_token
    max_pages = -(-llm.engine.max_model_len // runner.page_size)
    return DecodeGraphs(fn, runner.backend, [1, 2, 4, 8], max_pages, runner.page_size, runner.device)


@pytest.mark.parametrize("attention", ["auto", "triton"])
def test_decode_steps_through_the_static_buffers_match_transformers(
    attention, tiny_qwen3, hf_tiny_qwen3, qwen_tokenizer, device
):
    """Rows past the batch are padding in a bucket, the page table is the fixed width, batch 1 runs in the
    bucket of 2; greedy outputs stay token-identical to transformers, eager and compiled."""
    ids = [qwen_tokenizer.encode(p) for p in PROMPTS[:5]]  # 5 rows: the bucket of 8 with 3 padding rows
    for compiled in (False, True):
        llm = LLM(
            str(tiny_qwen3), dtype=torch.float32, progress_bar=False, enforce_eager=not compiled, page_size=4,
            device=device, attention=attention,
        )  # fmt: skip
        graphs = decode_graphs_for(llm, compiled)
        llm.engine.runner.decode_graphs = graphs
        used: list[int] = []
        run = graphs.run
        graphs.run = lambda *a, _run=run, _used=used: _used.append(len(a[0])) or _run(*a)
        eos = llm.engine.eos_token_ids
        want = [trim_at_eos(t, eos) for t in hf_greedy(hf_tiny_qwen3, ids, 8)]
        params = SamplingParams(max_tokens=8, temperature=0)
        assert [o.outputs[0].token_ids for o in llm.generate_outputs(ids, params)] == want, compiled
        assert [o.outputs[0].token_ids for o in llm.generate_outputs(ids[:1], params)] == want[:1], compiled
        assert 5 in used and 1 in used, "decode steps should have gone through the static buffers"
    assert graph_buckets([1, 2, 4, 8]) == [2, 4, 8]
