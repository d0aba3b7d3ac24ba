"""Speculative decoding (spec=ngram): greedy output token-identical to transformers (and so to spec=none) under
the engine's configurations, sampled output distributed as the target's, KV pages all back afterwards.

The model is a tiny random Qwen3 with a 64-token vocabulary: its greedy continuations repeat short patterns,
so prompt lookup proposes often and is right often enough (each test asserts drafts were accepted) for the
verification paths to be exercised, rejections included.
"""

from __future__ import annotations

import random
import re
import time

import pytest
import torch
from conftest import hf_greedy, make_tiny_qwen3, save_checkpoint, trim_at_eos

from engine import LLM, SamplingParams
from engine.config import ConfigError, compose_config, compose_overrides
from engine.sequence import Sequence
from engine.spec.governor import Governor
from engine.spec.ngram import NgramProposer

VOCAB = 64
MAX_NEW = 40
# Always speculate: on a tiny model the governor's timings would decide at random whether drafts run.
ALWAYS = {"spec.only_when_faster": False}

CONFIGS = {
    "eager": dict(enforce_eager=True),
    # Drafts cut by the step's token budget, and prefill chunks in the same steps as verifications.
    "chunked-prefill-7": dict(enforce_eager=True, max_num_batched_tokens=7),
    "no-prefix-cache": dict(enforce_eager=True, cache="none"),
    "page-size-4": dict(enforce_eager=True, page_size=4),
    "flex": dict(enforce_eager=True, attention="flex"),
    # Verification steps through the compiled prefill graph, decode steps through the decode graph.
    "compiled": dict(max_num_batched_tokens=32),
    # ~70 tokens per sequence at page size 4: a few at a time; drafts find no free page and are dropped.
    "preempting": dict(enforce_eager=True, page_size=4, num_pages=40, max_num_batched_tokens=64),
    "k8-not-adaptive": {"enforce_eager": True, "spec.num_tokens": 8, "spec.adaptive": False, "spec.min_ngram": 1},
    # Timed: whether drafts run is the governor's choice, the output the same either way.
    "governed": {"enforce_eager": True, "spec.only_when_faster": True},
    # The draft in int8 beside a float target (spec=draft only).
    "int8-draft": {"enforce_eager": True, "spec.quant": "int8"},
}
SLOW = {"flex", "compiled"}


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-vocab-qwen3"), vocab=VOCAB)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    base = [[rng.randrange(VOCAB - 2) for _ in range(rng.randrange(5, 40))] for _ in range(8)]
    return base + [base[0] + [5, 6, 7], base[1]]  # a shared prefix and a repeat for the prefix cache


@pytest.fixture(scope="module")
def reference(tiny_vocab, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_vocab, dtype=torch.float32).eval()
    return [trim_at_eos(out, {VOCAB - 1}) for out in hf_greedy(model, prompts, MAX_NEW)]


def _pool_is_full(llm: LLM) -> bool:
    s = llm.engine.stats()
    return s["running"] == s["waiting"] == 0 and s["kv_pages_free"] + s["kv_pages_evictable"] == s["kv_pages_total"]


def _noisy_copy(model_dir, out_dir, scale: float = 0.1):
    """The model with noise on every weight: a draft that agrees with it often, not always."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return save_checkpoint(model, out_dir, files_from=model_dir)


@pytest.fixture(scope="module")
def noisy_draft(tiny_vocab, tmp_path_factory):
    return _noisy_copy(tiny_vocab, tmp_path_factory.mktemp("noisy-draft"))


DRAFT_CONFIGS = ("eager", "chunked-prefill-7", "no-prefix-cache", "preempting", "compiled", "int8-draft")
SPEC_CASES = [("ngram", name) for name in CONFIGS if name != "int8-draft"] + [("draft", n) for n in DRAFT_CONFIGS]


@pytest.mark.parametrize(
    ("spec", "name"), [pytest.param(*case, marks=pytest.mark.slow) if case[1] in SLOW else case for case in SPEC_CASES]
)
def test_greedy_speculation_matches_transformers(spec, name, request, tiny_vocab, prompts, reference, device):
    """The proposer drafts (prompt lookup, or a noisy copy of the target), the target verifies: the output is
    the target's, and every KV page (the draft's own pool included) is free once the sequences are done."""
    draft = {"spec.model.path": str(request.getfixturevalue("noisy_draft"))} if spec == "draft" else {}
    llm = LLM(
        str(tiny_vocab),
        dtype=torch.float32,
        progress_bar=False,
        device=device,
        spec=spec,
        **{**ALWAYS, **draft, **CONFIGS[name]},
    )
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    for attempt in range(2):  # the second pass finds every prompt in the prefix cache
        outs = llm.generate_outputs(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == reference, f"{spec} {name}, pass {attempt}"
    stats = llm.engine.stats()
    if name == "governed":
        return
    assert stats["spec_accepted_tokens"] > 20, stats  # the drafts were used, not just proposed
    assert stats["spec_proposed_tokens"] > stats["spec_accepted_tokens"], stats  # and some were rejected
    assert sum(o.usage.accepted_prediction_tokens for o in outs) > 0
    assert _pool_is_full(llm), "KV pages leaked"
    assert spec != "draft" or llm.engine.proposer.pool_is_free(), "the draft's KV pages leaked"
    if name == "preempting":
        assert stats["preemptions"] > 0
    if name == "int8-draft":
        kinds = {type(m).__name__ for m in llm.engine.proposer.runner.model.modules()}
        assert "Int8Linear" in kinds and "Int8Linear" not in {
            type(m).__name__ for m in llm.engine.runner.model.modules()
        }


def test_logprobs_n_and_max_tokens_inside_an_accepted_run(tiny_vocab, prompts):
    """Reported logprobs are the target's at each kept token, n > 1 choices each speculate, and max_tokens
    ends a run of accepted tokens exactly where it says."""
    runs = {}
    for spec in ("none", "ngram"):
        llm = LLM(str(tiny_vocab), dtype=torch.float32, progress_bar=False, enforce_eager=True, spec=spec, **ALWAYS)
        params = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, logprobs=3, n=2)
        runs[spec] = llm.generate_outputs(prompts, params)
        assert _pool_is_full(llm)
    for plain, spec in zip(runs["none"], runs["ngram"]):
        for a, b in zip(plain.outputs, spec.outputs):
            assert b.token_ids == a.token_ids and len(b.token_ids) == 23
            assert [t for _, top in b.logprobs for t, _ in top] == [t for _, top in a.logprobs for t, _ in top]
            got, want = (torch.tensor([lp for lp, _ in c.logprobs]) for c in (b, a))
            assert torch.allclose(got, want, atol=1e-4)
    assert sum(o.usage.accepted_prediction_tokens for o in runs["ngram"]) > 0


def test_stop_strings_and_eos_inside_accepted_runs(tiny_vocab, prompts):
    """A stop string or EOS landing inside an accepted run ends the text where it would without speculation."""
    texts = {}
    for spec in ("none", "ngram"):
        llm = LLM(str(tiny_vocab), dtype=torch.float32, progress_bar=False, enforce_eager=True, spec=spec, **ALWAYS)
        eos = llm.generate_outputs(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
        free = llm.generate_outputs(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True))
        # Stop at a piece of each prompt's output from its middle (ids below 64 are one character each).
        stops = [SamplingParams(max_tokens=MAX_NEW, temperature=0, stop=[o.outputs[0].text[20:22]]) for o in free]
        stopped = llm.generate_outputs(prompts, stops)
        texts[spec] = [[(o.outputs[0].text, o.outputs[0].finish_reason) for o in batch] for batch in (eos, stopped)]
        assert _pool_is_full(llm)
    assert texts["ngram"] == texts["none"]
    assert any(reason == "stop" and len(text) < MAX_NEW for text, reason in texts["ngram"][1])


def test_structured_output_cuts_drafts_the_grammar_refuses(tiny_qwen3):
    """Constrained rows speculate too; the constraint holds and the output is spec=none's."""
    prompts = ["Count in hex:", "Digits:", "1, 2, 3, 4,"]
    params = SamplingParams(max_tokens=30, temperature=0, regex="([0-9A-F]{2} ){1,20}")
    texts, stats = {}, {}
    for spec in ("none", "ngram"):
        llm = LLM(
            str(tiny_qwen3),
            dtype=torch.float32,
            progress_bar=False,
            enforce_eager=True,
            spec=spec,
            **{"spec.min_ngram": 1, "spec.adaptive": False},
            **ALWAYS,
        )
        texts[spec] = [o.outputs[0].text for o in llm.generate_outputs(prompts, params)]
        stats[spec] = llm.engine.stats()
        assert _pool_is_full(llm)
    assert texts["ngram"] == texts["none"]
    assert all(re.fullmatch("([0-9A-F]{2} ){1,20}", t) for t in texts["ngram"]), texts
    assert stats["ngram"]["spec_accepted_tokens"] > 0, stats


def test_aborts_and_preemption_return_every_page(tiny_vocab, prompts):
    llm = LLM(
        str(tiny_vocab),
        dtype=torch.float32,
        progress_bar=False,
        enforce_eager=True,
        spec="ngram",
        page_size=4,
        num_pages=40,
        **ALWAYS,  # the governor would stop drafting where drafts cost time, and this test needs drafts
    )
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_sequence(f"s{i}", p, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    for _ in range(30):
        engine.step()
    assert engine.stats()["spec_accepted_tokens"] > 0
    for i in range(len(prompts)):
        engine.abort_sequence(f"s{i}")
    assert _pool_is_full(llm), "KV pages leaked"
    assert engine.stats()["preemptions"] > 0


def _exact_distribution(model_dir, prompt: list[int], top_p: float) -> dict[tuple[int, int], float]:
    """P(second and third sampled tokens) at temperature 1 with top-p, from transformers' logits (summed over
    the first: it is sampled after the prompt, before any draft)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def next_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        ordered, order = probs.sort(descending=True)
        keep = (ordered.cumsum(0) - ordered) < top_p  # the engine's rule: the mass above a kept token is < p
        kept = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return kept / kept.sum()

    exact: dict[tuple[int, int], float] = {}
    for a, pa in enumerate(next_probs(prompt).tolist()):
        for b, pb in enumerate(next_probs(prompt + [a]).tolist() if pa else []):
            for c, pc in enumerate(next_probs(prompt + [a, b]).tolist() if pb else []):
                exact[b, c] = exact.get((b, c), 0.0) + pa * pb * pc
    return {k: v for k, v in exact.items() if v > 0}


DISTRIBUTION_CASES = [
    ("ngram", 1.0),
    ("ngram", 0.8),
    ("greedy-draft", 1.0),
    ("sampled-draft", 1.0),
    ("sampled-draft", 0.8),
]


@pytest.mark.parametrize(("spec", "top_p"), DISTRIBUTION_CASES)
def test_sampling_keeps_the_target_distribution(tmp_path, spec, top_p):
    """With a proposal at every step (prompt lookup; the model as its own greedy draft; a noisy copy's sampled
    draft, kept with probability min(1, p/q)), the sampled tokens are distributed as the target model's: total
    variation of the (second, third) token pair from the exact distribution, over 4000 seeds (the second is
    verified against a draft, the third is the target's own after it, or a draft's)."""
    model_dir = make_tiny_qwen3(tmp_path / "m", vocab=6, seed=2)
    proposer = {
        "ngram": {"spec.min_ngram": 1},
        "greedy-draft": {"spec.model.path": str(model_dir), "spec.sample_drafts": False},
        "sampled-draft": {"spec.model.path": str(_noisy_copy(model_dir, tmp_path / "d", scale=0.5))},
    }[spec]
    llm = LLM(
        str(model_dir),
        dtype=torch.float32,
        progress_bar=False,
        enforce_eager=True,
        spec="ngram" if spec == "ngram" else "draft",
        max_running_requests=256,
        **{"spec.adaptive": False, **proposer},
        **ALWAYS,
    )
    # The model's own greedy continuation as the prompt: what it repeats, prompt lookup proposes.
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = [0, 1, 2, 3] + llm.generate_outputs([[0, 1, 2, 3]], greedy)[0].outputs[0].token_ids
    exact = _exact_distribution(model_dir, prompt, top_p)
    n = 4000
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_p=top_p, seed=s, ignore_eos=True) for s in range(n)]
    outs = llm.generate_outputs([prompt] * n, params)
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids[1:])
        counts[key] = counts.get(key, 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in set(counts) | set(exact))
    assert set(counts) <= set(exact), "sampled a pair top-p excludes"
    # Sampling noise alone gives ~0.03 here; keeping every draft would move the draft tokens' share.
    assert tv < 0.06, (tv, counts, exact)
    accepted = sum(o.usage.accepted_prediction_tokens for o in outs)
    rejected = sum(o.usage.rejected_prediction_tokens for o in outs)
    assert accepted > n / 10 and rejected > n / 10, (accepted, rejected, prompt)


def test_sampled_drafts_are_accepted_where_the_draft_agrees(tiny_vocab, prompts):
    """The target as its own draft at temperature 1: a sampled draft (q = p up to the step's rounding) is kept
    almost always, a greedy one only when the target's own draw happens to be its argmax; and with greedy
    drafts a seeded request samples exactly the tokens it samples without speculation."""
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))]
    plain = LLM(tiny_vocab, dtype=torch.float32, progress_bar=False, enforce_eager=True)
    without = [o.outputs[0].token_ids for o in plain.generate_outputs(prompts, params)]
    rates, tokens = {}, {}
    for sample in (True, False):
        llm = LLM(
            tiny_vocab,
            dtype=torch.float32,
            progress_bar=False,
            enforce_eager=True,
            spec="draft",
            **{"spec.model.path": tiny_vocab, "spec.sample_drafts": sample, "spec.adaptive": False},
            **ALWAYS,
        )
        outs = llm.generate_outputs(prompts, params)
        tokens[sample] = [o.outputs[0].token_ids for o in outs]
        accepted = sum(o.usage.accepted_prediction_tokens for o in outs)
        rates[sample] = accepted / (accepted + sum(o.usage.rejected_prediction_tokens for o in outs))
        assert _pool_is_full(llm) and llm.engine.proposer.pool_is_free()
    assert rates[True] > 0.95 and rates[False] < 0.8, rates
    assert tokens[False] == without and tokens[True] != without


def test_a_draft_catches_up_in_decode_rows(tiny_vocab, prompts, reference):
    """After a verification that kept every drafted token the draft has two tokens to compute (its last drafted
    token and the target's own): as decode rows of one token each, not as a prefill step, so only the prompts
    go through prefill steps. The target as its own draft keeps (almost) every draft."""
    llm = LLM(
        str(tiny_vocab),
        dtype=torch.float32,
        progress_bar=False,
        enforce_eager=True,
        spec="draft",
        **{"spec.model.path": str(tiny_vocab), "spec.adaptive": False},
        **ALWAYS,
    )
    runner, decode_only = llm.engine.proposer.runner, []
    run = runner.run
    runner.run = lambda batch, *a: decode_only.append(batch.is_decode_only) or run(batch, *a)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    for prompt, want in zip(prompts[:3], reference):
        assert llm.generate_outputs([prompt], params)[0].outputs[0].token_ids == want
    assert decode_only.count(False) == 3 and decode_only.count(True) > 20, decode_only
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] > 0.9 * stats["spec_proposed_tokens"] > 30, stats


def test_a_draft_with_another_vocabulary_is_refused_and_padding_tokens_get_no_draft(tiny_vocab, tmp_path):
    """A draft whose vocabulary differs by more than padding is refused at start-up naming spec.model.path; one
    a token short (a padded target) drafts for every sequence but one holding the token it cannot embed."""
    other = make_tiny_qwen3(tmp_path / "other", vocab=VOCAB * 2)
    with pytest.raises(ValueError, match=r"spec\.model\.path.*share the target's tokenizer"):
        LLM(str(tiny_vocab), dtype=torch.float32, progress_bar=False, spec="draft", **{"spec.model.path": str(other)})
    target = make_tiny_qwen3(tmp_path / "target", vocab=200)
    draft = make_tiny_qwen3(tmp_path / "draft", vocab=199)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [1, 2, 199, 4, 5]]
    want = [
        o.outputs[0].token_ids
        for o in LLM(str(target), dtype=torch.float32, progress_bar=False, enforce_eager=True).generate_outputs(
            prompts, params
        )
    ]
    llm = LLM(
        str(target),
        dtype=torch.float32,
        progress_bar=False,
        enforce_eager=True,
        spec="draft",
        **{"spec.model.path": str(draft), "spec.adaptive": False},
        **ALWAYS,
    )
    outs = llm.generate_outputs(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    proposed = [o.usage.accepted_prediction_tokens + o.usage.rejected_prediction_tokens for o in outs]
    assert proposed[0] > 0 and proposed[1] == 0, proposed
    assert _pool_is_full(llm) and llm.engine.proposer.pool_is_free()


def test_each_runner_compiles_with_its_own_freezing():
    """Inductor reads `freezing` globally when a graph compiles, inside the compiled function's first call: a
    float target's graphs keep theirs (frozen, prepacked GEMMs) after a quantized draft's runner turned it off."""
    import torch._inductor.config as inductor_config

    from engine.step_graphs import _named

    seen = []
    step = _named(lambda ids: seen.append(inductor_config.freezing) or ids, "a graph", frozen=True)
    with inductor_config.patch(freezing=False):  # what the draft's compile options leave behind
        step(torch.zeros(1))
        assert inductor_config.freezing is False
    assert seen == [True]


def test_ngram_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(num_tokens=3, min_ngram=1, max_ngram=3, adaptive=False)
    params = SamplingParams()

    def propose(tokens: list[int], limit: int = 3) -> list[int]:
        return proposer.propose([Sequence("s", tokens, params, 0)], [limit])[0]

    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 2, 3]) == [7, 8, 4]  # "2 3" last occurred before "7 8 4"
    assert propose([5, 1, 2, 6, 1, 2]) == [6, 1, 2]
    assert propose([1, 2, 3, 4, 1, 2, 3], limit=2) == [4, 1]
    assert propose([1, 2, 3]) == []  # the last token occurs nowhere before
    # The longest suffix wins over a later shorter match: "1 2 3" -> 4, though "3" alone last preceded 5.
    assert propose([1, 2, 3, 4, 3, 5, 1, 2, 3]) == [4, 3, 5]


def test_adaptive_length_backs_off_and_retries():
    proposer = NgramProposer(num_tokens=4, min_ngram=1, max_ngram=2, min_acceptance=0.3)
    seq = Sequence("s", [1, 2, 1, 2, 1], SamplingParams(), 0)
    assert proposer.length(seq) == 4
    proposer.observe(seq, 4, 0)
    assert proposer.length(seq) == 3  # about one more than the recent accepted length
    proposer.observe(seq, 3, 0)  # acceptance below min_acceptance: a pause of 8 steps
    assert [proposer.length(seq) for _ in range(9)] == [0] * 8 + [4]
    proposer.observe(seq, 4, 0)
    proposer.observe(seq, 3, 0)
    assert [proposer.length(seq) for _ in range(17)] == [0] * 16 + [4]  # the next pause is twice as long


def test_adaptive_length_grows_back_while_drafts_are_kept_whole():
    proposer = NgramProposer(num_tokens=7, min_ngram=1, max_ngram=2, min_acceptance=0.3)
    seq = Sequence("s", [1, 2, 1, 2, 1], SamplingParams(), 0)
    proposer.observe(seq, 7, 1)  # one token of seven kept (the renamed identifier of a copy)
    lengths = []
    for _ in range(4):
        lengths.append(proposer.length(seq))
        proposer.observe(seq, lengths[-1], lengths[-1])
    assert lengths == [5, 6, 7, 7]  # a moving average alone stayed at 5 for ~50 steps


@pytest.mark.parametrize("key,value", [("spec.num_tokens", 0), ("spec.num_tokens", 2.5), ("spec.min_acceptance", 1.5)])
def test_bad_spec_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(spec="ngram", **{key: value})


@pytest.mark.parametrize("spec", ["none", "ngram", "draft"])
def test_a_sweep_sets_the_shared_spec_keys_for_every_choice(spec):
    """`-m spec=none,ngram spec.num_tokens=2,4,8` composes for every choice (spec=none takes and ignores them)."""
    overrides = [f"spec={spec}", "spec.num_tokens=2", "spec.adaptive=false", "spec.only_when_faster=false"]
    cfg = compose_overrides(overrides + ["++spec.model.path=x"])
    assert cfg.spec.kwargs["num_tokens"] == 2 and cfg.spec.kwargs["adaptive"] is False


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"spec": "draft"}, "spec.model.path"),
        ({"spec": "draft", "spec.model.path": "x", "parallel.tp": 2}, "spec"),
        ({"spec": "draft", "spec.model.path": "x", "spec.sample_drafts": "yes"}, "spec.sample_drafts"),
        ({"spec": "draft", "spec.model.path": "x", "spec.quant": "q4"}, "spec.quant"),
    ],
)
def test_draft_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        compose_config(**overrides)


def test_server_streams_speculated_tokens_and_reports_them(tiny_vocab, prompts, tmp_path):
    """`python server.py spec=ngram`: a streamed completion's text is spec=none's, its usage counts the kept and
    dropped draft tokens under OpenAI's names, and /metrics counts them too."""
    import httpx
    import openai
    from live_server import MODEL, running_server

    llm = LLM(str(tiny_vocab), dtype=torch.float32, progress_bar=False, enforce_eager=True)
    expected = llm.generate_outputs(prompts[:3], SamplingParams(max_tokens=MAX_NEW, temperature=0))
    with running_server(tiny_vocab, tmp_path, "spec=ngram", "spec.only_when_faster=false") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        for prompt, want in zip(prompts[:3], expected):
            chunks = list(
                client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=MAX_NEW,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
            usage = chunks[-1].usage
            assert usage.completion_tokens == len(want.outputs[0].token_ids)
            if usage.completion_tokens_details.accepted_prediction_tokens:  # a step sent several tokens at once
                assert len([c for c in chunks if c.choices]) < usage.completion_tokens
        usage = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=MAX_NEW, temperature=0).usage
        assert usage.completion_tokens_details.accepted_prediction_tokens > 0
        assert usage.completion_tokens_details.rejected_prediction_tokens > 0
        metrics = httpx.get(f"{url}/metrics").text
        accepted = float(re.search(r"^engine_spec_accepted_tokens (\S+)$", metrics, re.M).group(1))
        assert accepted >= usage.completion_tokens_details.accepted_prediction_tokens


def test_tensor_parallel_speculates_like_one_rank(tiny_vocab, prompts, reference):
    """Rank 0 proposes and verifies; the other rank runs the same verification steps on its shard."""
    kw = dict(dtype=torch.float32, enforce_eager=True, progress_bar=False, quant="none", spec="ngram", **ALWAYS)
    with LLM(str(tiny_vocab), **kw, **{"parallel.tp": 2}) as llm:
        outs = llm.generate_outputs(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert llm.engine.stats()["spec_accepted_tokens"] > 5


def test_governor_keeps_the_faster_choice_and_tries_the_other_ever_less_often():
    governor = Governor(explore_every=8, explore_at_most_every=64)
    spec_rate = {True: 40.0, False: 100.0}  # tokens per second: drafts slower at first

    def decide(count: int) -> list[bool]:
        choices = []
        for _ in range(count):
            spec = governor.allow(1)
            choices.append(spec)
            governor.record(spec, 1, 4, 4 / spec_rate[spec])
        return choices

    choices = decide(300)
    assert choices[:2] == [True, False]  # each measured once
    tries = [i for i, c in enumerate(choices) if c][1:]
    assert tries[0] == 1 + 8 and [b - a for a, b in zip(tries, tries[1:])] == [16, 32, 64, 64, 64], tries
    spec_rate[True] = 300.0  # a copy-heavy workload arrives: the next try notices, and drafts stay on
    choices = decide(200)
    first = choices.index(True)
    assert first < 64 and all(choices[first : first + 7])
    tries = [i for i, c in enumerate(choices) if not c and i > first]
    assert tries[0] - first == 8, tries  # the other choice watched closely again after the change
    assert governor.rates[True, 1] > governor.rates[False, 1]
    assert governor.allow(32) is True  # another batch-size class is measured afresh


def test_the_governor_does_not_time_steps_that_compiled(tiny_vocab, prompts, monkeypatch):
    """A lazily compiled engine compiles a graph inside its first steps of each shape: timed, the first 4-row
    verification (27.6 s) set the rate of speculating at batch 1 to 0.04 tok/s, and drafts stayed off for most of
    the next hundred steps. Here the first four decode steps 'compile' (dynamo's callback, and a second's wait)."""
    from engine import step_graphs

    llm = LLM(str(tiny_vocab), dtype="float32", enforce_eager=True, progress_bar=False, quant="none", spec="ngram")
    run, compiling = llm.engine.runner.run, [4]

    def run_compiling_first(batch):
        if batch.is_decoding and compiling[0]:
            compiling[0] -= 1
            step_graphs._compile_started(None)
            time.sleep(1.0)
        return run(batch)

    timed = []
    record = llm.engine.governor.record
    monkeypatch.setattr(llm.engine.runner, "run", run_compiling_first)
    monkeypatch.setattr(llm.engine.governor, "record", lambda *a: (timed.append(a), record(*a)))
    llm.generate_outputs(prompts[:1], SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert compiling == [0] and len(timed) >= 10
    assert max(seconds for *_, seconds in timed) < 0.5, timed


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant", ["int4", "none"])
def test_verification_rows_compute_what_decode_rows_compute(quant, dtype, eager, tmp_path, monkeypatch):
    """Bit for bit: a verification step runs as a decode step of one row per token, so the logprob of every
    token, kept from a verification or from a plain decode step, is the one spec=none gives it (through the
    prefill graph, 3 of these 4 cases failed, fp32 included; compiled in bf16 the batch-1 graph parted too until
    the residual stream and the one-row products were rounded explicitly, kernels/fusion.py `rounded`). Quantized
    throughout (int4 layers, int8 heads), each of up to 8 rows is computed as a lone row; with float weights
    (quant=none) every GEMM of up to 8 rows is one call of 8 (a GEMM's bits for a row depend on its row count:
    every float case failed before that)."""
    from test_quantization import write_tiny_gguf

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    path = write_tiny_gguf(tmp_path / "tiny-q4.gguf")
    prompts = [[50, 51, 52, 53, 50, 51, 52, 53, 50, 51], [60, 61, 62, 60, 61, 62, 60]]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=True)
    spec = {"spec.num_tokens": 3, "spec.adaptive": False, "spec.min_ngram": 1}
    runs, stats = {}, {}
    for name, extra in (("none", {}), ("ngram", {"spec": "ngram", **ALWAYS, **spec})):
        llm = LLM(str(path), dtype=dtype, quant=quant, cache="none", enforce_eager=eager, progress_bar=False, **extra)
        outs = llm.generate_outputs(prompts, params) + llm.generate_outputs(prompts[:1], params)  # batch 2, 1
        runs[name] = [[(t, lp) for t, (lp, _) in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        stats[name] = llm.engine.stats()
        llm.shutdown()
    assert stats["ngram"]["spec_proposed_tokens"] > 10, stats["ngram"]
    assert runs["ngram"] == runs["none"]


@pytest.mark.slow
def test_smollm2_default_weights_speculate_token_identically():
    """The real SmolLM2 in the default config (quant=auto: int4 layers, int8 head; compiled; `dtype=auto`, so
    bf16 on CPUs with AVX-512 BF16 or AMX): prompt lookup on answers that copy their prompt gives spec=none's
    greedy tokens, verification steps included. In bf16 one answer parted after 22 tokens until verification
    rows ran as decode rows and bf16 values were rounded where inductor had dropped it (2026-12-05, #29)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from spec_decode import WORKLOADS

    outputs, stats = {}, {}
    for spec in ("none", "ngram"):
        llm = LLM(spec=spec, progress_bar=False, cache="none", **ALWAYS)
        messages = [[{"role": "user", "content": text}] for text in WORKLOADS["copy"]]
        outs = llm.chat_outputs(messages, SamplingParams(max_tokens=48, temperature=0))
        outputs[spec] = [o.outputs[0].token_ids for o in outs]
        stats[spec] = llm.engine.stats()
        llm.shutdown()
    assert outputs["ngram"] == outputs["none"]
    assert stats["ngram"]["spec_accepted_tokens"] > 10, stats["ngram"]
