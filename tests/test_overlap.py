"""Overlap scheduling (`overlap=true`, engine/overlap.py): the same tokens, logprobs and finish reasons as steps
run one after another, under every scheduler and cache, with preemption, chunked prefill, stop tokens and strings,
aborts and structured output; no KV page leaked; and the steps really overlap."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from engine import LLM, SamplingParams
from engine.config import ConfigError

CONFIGS = {
    "fcfs-radix": {},
    "lpm": dict(scheduler="lpm", max_num_batched_tokens=32),
    "priority": dict(scheduler="priority", max_running_requests=3),
    "no-prefix-cache": dict(cache="none"),
    "chunked-prefill-7": dict(max_num_batched_tokens=7),
    # ~40 tokens of KV per sequence at page size 4 -> 16 pages hold one or two at a time.
    "preempting": dict(page_size=4, num_pages=17, max_num_batched_tokens=64),
    "batch-invariant": dict(batch_invariant=True, max_num_batched_tokens=16),
}


def _llm(tiny_qwen3, overlap: bool, **overrides) -> LLM:
    return LLM(
        str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False, overlap=overlap, **overrides
    )


def _requests(stops: list[int], sampled: bool) -> tuple[list[str], list[SamplingParams]]:
    """Greedy rows with logprobs, lengths that end on different steps, a stop token (`stops`: one per prompt, one
    it emits) that ends sequences on a token the host learns of only after the next step was launched; and seeded
    sampled rows where `sampled`."""
    params = [
        lambda stop: SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=2),
        lambda stop: SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        lambda stop: SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop]),
    ]
    if sampled:
        params += [
            lambda stop: SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, seed=5),
            lambda stop: SamplingParams(max_tokens=14, temperature=1.2, seed=7, stop_token_ids=[stop]),
        ]
    prompts = PROMPTS * 2
    return prompts, [params[i % len(params)](stops[i % len(PROMPTS)]) for i in range(len(prompts))]


def _summary(outs) -> list[tuple]:
    return [(c.token_ids, c.finish_reason, [lp for lp, _ in c.logprobs or []]) for o in outs for c in o.outputs]


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == [pytest.approx(w[2], abs=1e-4) for w in want]


def _count_overlapped_launches(llm: LLM) -> list[bool]:
    """Per launched step, whether the step before it was still unread then."""
    engine, seen = llm.engine, []
    launch = engine._launch

    def counted(batch, _launch=launch):
        seen.append(engine.in_flight is not None)
        return _launch(batch)

    engine._launch = counted
    return seen


def _assert_no_leak(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s["running"] == s["waiting"] == 0
    # A step may still run for sequences that ended on the token before it; it holds no pages.
    assert llm.engine.in_flight is None or all(seq.is_finished for seq in llm.engine.in_flight.sampled)
    assert s["kv_pages_free"] + s["kv_pages_evictable"] == s["kv_pages_total"], "KV pages leaked"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_steps_run_in_turn(name, tiny_qwen3):
    """Greedy rows everywhere. Seeded sampled rows where a step's rows are computed as they would be alone: a
    sequence that ends on a token the host has not seen holds its running slot and a row one step longer, so later
    steps can differ in size, and a sampled token can then cross a boundary of its distribution on the last bit
    (as between any two batchings, README "Batch invariance")."""
    results = {}
    for overlap in (False, True):
        llm = _llm(tiny_qwen3, overlap, **CONFIGS[name])
        # Stop tokens the model does emit: each prompt's fourth greedy token.
        firsts = llm.generate_outputs(PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        prompts, params = _requests([o.outputs[0].token_ids[3] for o in firsts], sampled=name == "batch-invariant")
        overlapped = _count_overlapped_launches(llm)
        results[overlap] = _summary(llm.generate_outputs(prompts, params))
        _assert_no_leak(llm)
        if overlap:
            assert sum(overlapped) > len(overlapped) // 2, "most steps should launch while the one before runs"
        if name == "preempting":
            assert llm.engine.stats()["preemptions"] > 0
        llm.engine.shutdown()
    _assert_same(results[True], results[False])
    assert any(reason == "stop" for _, reason, _ in results[True])


def test_a_sequence_that_ends_by_length_is_not_scheduled_again(tiny_qwen3):
    """Without EOS the overlapped engine computes exactly the rows the serial one does: a sequence whose last token
    is in flight is known to end there."""
    rows = {}
    for overlap in (False, True):
        llm = _llm(tiny_qwen3, overlap)
        counts: list[int] = []
        run = llm.engine.runner.run

        def counted(batch, *args, _run=run, _counts=counts):
            _counts.append(sum(batch.num_new_tokens))
            return _run(batch, *args)

        llm.engine.runner.run = counted
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 2, 5, 9)]
        llm.generate_outputs(PROMPTS[:4], params)
        rows[overlap] = sum(counts)
        llm.engine.shutdown()
    assert rows[True] == rows[False]


def test_stop_strings_and_structured_output_match(tiny_qwen3):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    texts = {}
    for overlap in (False, True):
        llm = _llm(tiny_qwen3, overlap)
        free = SamplingParams(max_tokens=16, temperature=0)
        if not texts:  # stop strings taken from the outputs themselves, so they do end the requests
            stops = [o.outputs[0].text[4:7] for o in llm.generate_outputs(PROMPTS[:4], free)]
        stopped = [SamplingParams(max_tokens=16, temperature=0, stop=[s]) for s in stops]
        constrained = SamplingParams(max_tokens=30, temperature=0.7, seed=3, json_schema=schema)
        outs = llm.generate_outputs(PROMPTS[:4] * 2, stopped + [constrained] * 4)
        assert all(o.outputs[0].finish_reason == "stop" for o in outs[:4])
        # Once the constrained requests are done, the free ones run overlapped again.
        later = llm.generate_outputs(PROMPTS[:4], stopped)
        texts[overlap] = [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs + later]
        _assert_no_leak(llm)
        llm.engine.shutdown()
    assert texts[True] == texts[False]


def test_an_abort_while_the_sequence_is_in_flight(tiny_qwen3, qwen_tokenizer):
    llm = _llm(tiny_qwen3, True)
    engine = llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_sequence(f"s{i}", qwen_tokenizer.encode(prompt), params)
    tokens: dict[str, list[int]] = {}
    for _ in range(4):
        for out in engine.step():
            tokens.setdefault(out.seq_id, []).extend(out.new_token_ids)
    assert engine.in_flight is not None and engine.seqs["s1"] in engine.in_flight.sampled
    engine.abort_sequence("s1")
    while engine.has_unfinished():
        for out in engine.step():
            assert out.seq_id != "s1", "no token after the abort"
            tokens.setdefault(out.seq_id, []).extend(out.new_token_ids)
    _assert_no_leak(llm)
    alone = _llm(tiny_qwen3, False).generate_outputs(PROMPTS[:3:2], params)
    assert [tokens["s0"], tokens["s2"]] == [o.outputs[0].token_ids for o in alone]
    engine.shutdown()


@pytest.mark.parametrize("overrides", [{"spec": "ngram"}, {"parallel.tp": 2}])
def test_overlap_refuses_what_it_cannot_do(overrides):
    with pytest.raises(ConfigError, match="overlap"):
        LLM(overlap=True, **overrides)


def test_placeholders_reach_the_cuda_graph_runners_static_buffers(tiny_qwen3):
    """Decode steps through engine/cuda_graphs.py (which off a GPU calls the step on the same static buffers) fill
    their placeholders there."""
    from test_gpu_step import decode_graphs_for

    want = None
    for overlap in (False, True):
        llm = _llm(tiny_qwen3, overlap, page_size=4)
        graphs = decode_graphs_for(llm, compiled=False)
        llm.engine.runner.decode_graphs = graphs
        used: list[int] = []
        run = graphs.run
        graphs.run = lambda *a, _run=run, _used=used: _used.append(len(a[0])) or _run(*a)
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate_outputs(PROMPTS[:5], params)]
        assert 5 in used, "decode steps should have gone through the static buffers"
        want = want or got
        assert got == want
