"""The Python API: generate / generate_outputs / chat / stream, sampling options, and bad input."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import PROMPTS

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False)


def assert_pool_full(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s["running"] == s["waiting"] == 0
    assert s["kv_pages_free"] + s["kv_pages_evictable"] == s["kv_pages_total"]


def test_generate_accepts_keywords_and_returns_texts(llm):
    texts = llm.generate(PROMPTS[:3], max_tokens=5, temperature=0)
    outs = llm.generate_outputs(PROMPTS[:3], SamplingParams(max_tokens=5, temperature=0))
    assert texts == [o.outputs[0].text for o in outs]
    for prompt, o in zip(PROMPTS, outs):
        assert o.prompt == prompt
        assert o.prompt_token_ids == llm.tokenizer.encode(prompt)  # raw text, no chat template
        assert o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 5
        assert o.usage.completion_tokens == 5 and o.usage.prompt_tokens == len(o.prompt_token_ids)
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_default_max_tokens_is_16(llm):
    assert SamplingParams().max_tokens == 16
    (out,) = llm.generate_outputs([PROMPTS[0]], temperature=0)
    assert len(out.outputs[0].token_ids) == 16


def test_token_id_prompts_are_used_as_given(llm):
    ids = [151644, 872, 198, 9707]
    (out,) = llm.generate_outputs([ids], max_tokens=3, temperature=0)
    assert out.prompt_token_ids == ids and out.prompt is None


def test_n_and_seed(llm):
    params = SamplingParams(n=3, max_tokens=8, temperature=5.0, seed=1234)
    first = llm.generate_outputs([PROMPTS[0]], params)[0]
    again = llm.generate_outputs([PROMPTS[1], PROMPTS[0]], [params, params])[1]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1, "the n choices should differ"
    texts = llm.generate([PROMPTS[0], PROMPTS[1]], n=2, max_tokens=2, temperature=0)
    assert len(texts) == 4 and texts[0] == texts[1]
    other = llm.generate_outputs([PROMPTS[0]], SamplingParams(n=3, max_tokens=8, temperature=5.0, seed=99))[0]
    assert [c.token_ids for c in other.outputs] != [c.token_ids for c in first.outputs]


def test_stop_strings_and_stop_token_ids(llm):
    (full,) = llm.generate_outputs([PROMPTS[3]], max_tokens=12, temperature=0)
    text, ids = full.outputs[0].text, full.outputs[0].token_ids
    piece = llm.tokenizer.decode(ids[5:7])
    (cut,) = llm.generate_outputs([PROMPTS[3]], max_tokens=12, temperature=0, stop=[piece])
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].text == text[: text.index(piece)]
    assert len(cut.outputs[0].token_ids) < len(ids)
    (by_id,) = llm.generate_outputs([PROMPTS[3]], max_tokens=12, temperature=0, stop_token_ids=[ids[3]])
    assert by_id.outputs[0].token_ids == ids[: ids.index(ids[3]) + 1]
    assert by_id.outputs[0].finish_reason == "stop"
    assert_pool_full(llm)


def test_eos_and_ignore_eos(llm):
    (full,) = llm.generate_outputs([PROMPTS[2]], max_tokens=6, temperature=0)
    ids = full.outputs[0].token_ids
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = {ids[2]}  # pretend the third generated token is EOS
    try:
        (stopped,) = llm.generate_outputs([PROMPTS[2]], max_tokens=6, temperature=0)
        (ignored,) = llm.generate_outputs([PROMPTS[2]], max_tokens=6, temperature=0, ignore_eos=True)
    finally:
        llm.engine.eos_token_ids = saved
    assert stopped.outputs[0].token_ids == ids[: ids.index(ids[2]) + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    assert ignored.outputs[0].token_ids == ids and ignored.outputs[0].finish_reason == "length"


def test_penalties_reach_the_sampler(llm):
    (o,) = llm.generate_outputs([PROMPTS[2]], max_tokens=10, temperature=0, repetition_penalty=1e6)
    ids = o.outputs[0].token_ids
    assert len(set(ids)) == 10, "a huge repetition penalty forbids repeats"
    assert not set(ids) & set(o.prompt_token_ids), "repetition penalty covers the prompt too"
    (p,) = llm.generate_outputs([PROMPTS[2]], max_tokens=10, temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    (base,) = llm.generate_outputs([PROMPTS[2]], max_tokens=10, temperature=0)
    assert len(set(p.outputs[0].token_ids)) >= len(set(base.outputs[0].token_ids))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(top_logprobs=50), "top_logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(seed="x"), "seed"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_invalid_sampling_values_name_the_field(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([PROMPTS[0]], **kwargs)
    assert_pool_full(llm)


def test_bad_prompts_and_lengths(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=10**6)])
    with pytest.raises(ValueError, match="token id"):
        llm.generate([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="no tokens"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([3.5])
    with pytest.raises(ValueError, match="2 given for 3"):
        llm.generate(PROMPTS[:3], [SamplingParams(), SamplingParams()])
    assert_pool_full(llm)  # the first, valid request of the failed batch was withdrawn


def test_bad_configuration_is_reported(tiny_qwen3, tmp_path):
    with pytest.raises(ValueError, match="scheduler='nope'"):
        LLM(str(tiny_qwen3), scheduler="nope")
    with pytest.raises(ValueError, match="unknown option 'warp_speed'"):
        LLM(str(tiny_qwen3), warp_speed=9)
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        LLM("no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        LLM(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_qwen3), dtype="int3")
    with pytest.raises(ValueError, match="compile.warmup='soon'"):
        LLM(str(tiny_qwen3), **{"compile.warmup": "soon"})


def test_chat_template_kwargs_reach_the_template(llm):
    msgs = [{"role": "user", "content": "hi"}]
    thinking = llm.encode_chat(msgs)
    plain = llm.encode_chat(msgs, {"enable_thinking": False})
    assert plain != thinking and "<think>" in llm.tokenizer.decode(plain)
    (out,) = llm.chat_outputs(msgs, max_tokens=3, temperature=0, chat_template_kwargs={"enable_thinking": False})
    assert out.prompt_token_ids == plain
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "wizard", "content": "x"}])


def test_async_stream_matches_generate_and_aborts(llm):
    expected = llm.generate(PROMPTS[:4], max_tokens=10, temperature=0)

    async def collect(prompt):
        return [piece async for piece in llm.stream(prompt, max_tokens=10, temperature=0)]

    async def abandon(prompt):
        async for _ in llm.stream(prompt, max_tokens=1000, temperature=0):
            break  # the consumer walks away after the first piece

    async def main():
        results = await asyncio.gather(*(collect(p) for p in PROMPTS[:4]), abandon(PROMPTS[5]))
        return results[:4]

    pieces = asyncio.run(main())
    assert ["".join(p) for p in pieces] == expected
    assert any(len(p) > 1 for p in pieces), "text should arrive in several pieces"
    assert_pool_full(llm)


@pytest.mark.slow
def test_a_script_sees_each_graph_compile(tiny_qwen3):
    """A script that sets up no logging still learns why its first generate takes long (one line per graph)."""
    import subprocess
    import sys

    prompt = "Hello there, how are you today?"  # several tokens: the prefill graph runs too
    llm = f"LLM({str(tiny_qwen3)!r}, dtype='float32')"
    code = f"from engine import LLM\nprint({llm}.generate([{prompt!r}], max_tokens=3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("[engine] compiling")]
    assert any("prefill graph" in line and "done in" in line for line in lines), out.stderr[-2000:]
    assert any("decode graph (batch 1)" in line and "done in" in line for line in lines), out.stderr[-2000:]
    assert "Autotune" not in out.stderr  # inductor's own tables stay off


def test_a_long_compilation_says_it_is_still_going(monkeypatch, caplog):
    """Between 'compiling ...' and 'done in' a progress line every PROGRESS_EVERY_S, and none after."""
    import logging
    import time

    from engine import progress, step_graphs

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.05)
    caplog.set_level(logging.INFO, logger="engine.step_graphs")
    step_graphs._calling.name = "decode graph (batch 1)"
    try:
        step_graphs._compile_started(None)
        time.sleep(0.3)
        step_graphs._compile_ended(None)
    finally:
        step_graphs._calling.name = None
    time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "compiling the decode graph (batch 1) ..." and "done in" in lines[-1]
    assert len([line for line in lines if line.endswith("s so far")]) >= 2


def test_a_slow_step_that_fails_says_so(monkeypatch, caplog):
    import logging

    from engine import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.05)
    caplog.set_level(logging.INFO, logger="engine.test")
    with pytest.raises(OSError), progress.progress(logging.getLogger("engine.test"), "reading x"):
        raise OSError("disk gone")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "reading x ..." and lines[-1].startswith("reading x: failed in")


def test_a_slow_step_is_announced_unless_a_progress_line_runs(monkeypatch, caplog):
    """A step that outlasts PROGRESS_EVERY_S with nothing announcing it (a compilation no label caught, a
    stall) gets its own lines; inside a labelled slow phase it stays quiet."""
    import logging
    import time

    from engine import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.1)
    log = logging.getLogger("engine.test")
    caplog.set_level(logging.INFO, logger="engine.test")
    with progress.slow_step(log, "a step of 3 tokens is still running"):
        time.sleep(1.5)  # the watch may be in the middle of a 1 s sleep taken before the patch
    announced = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("a step of 3 tokens is still running: ") for m in announced), announced
    caplog.clear()
    with progress.progress(log, "compiling x"), progress.slow_step(log, "quiet step"):
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.getMessage().startswith("quiet step")]
    with progress.slow_step(log, "fast step"):
        pass
    time.sleep(0.3)
    assert not [r for r in caplog.records if r.getMessage().startswith("fast step")]
