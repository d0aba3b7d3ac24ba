"""Sampling filters and penalties against transformers' logits processors; seeds; distributions."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.kernels.sampling import apply_penalties, apply_top_k_top_p_min_p, sample_from_probs
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

V = 50


def hf_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(None, x)
    return x


@pytest.mark.parametrize("seed", range(5))
def test_filters_match_transformers_row_by_row(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=g) * 3
    settings = [
        (1.0, 0, 1.0, 0.0),
        (0.7, 5, 1.0, 0.0),
        (1.3, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.5, 10, 0.9, 0.05),
        (2.0, 1, 0.5, 0.0),
    ]
    t, k, p, m = (torch.tensor(col) for col in zip(*settings))
    ours = apply_top_k_top_p_min_p(logits / t.float().unsqueeze(1), k.long(), p.float(), m.float())
    for row, (temp, top_k, top_p, min_p) in enumerate(settings):
        ref = hf_filter(logits[row : row + 1], temp, top_k, top_p, min_p)[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(ref)), f"row {row} keeps different tokens"
        kept = ~torch.isinf(ref)
        assert torch.allclose(ours[row][kept], ref[kept], atol=1e-5)


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, V, generator=g)
    prompt, output = [[1, 2, 3], [4]], [[3, 3, 7], [4, 9, 9, 9]]
    counts = torch.zeros(2, V)
    for i, ids in enumerate(output):
        for t in ids:
            counts[i, t] += 1
    seen = counts > 0
    for i, ids in enumerate(prompt):
        seen[i, ids] = True
    rep = torch.tensor([1.3, 0.8])
    ours = apply_penalties(logits, counts, seen, torch.tensor([0.5, 0.0]), torch.tensor([0.2, 1.0]), rep)
    for i in range(2):
        ref = RepetitionPenaltyLogitsProcessor(rep[i].item())(
            torch.tensor([prompt[i] + output[i]]), logits[i : i + 1].clone()
        )[0]
        ref -= [0.2, 1.0][i] * counts[i] + [0.5, 0.0][i] * (counts[i] > 0).float()
        assert torch.allclose(ours[i], ref, atol=1e-6)


def test_a_top_p_below_float32_keeps_the_top_token():
    """top_p=5e-324 (valid JSON, > 0) is 0 in float32: the top token still survives, and sampling takes it (it
    sampled from a row of NaNs and returned a token past the vocabulary, which killed the engine)."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    kept = apply_top_k_top_p_min_p(
        logits, torch.tensor([0]), torch.tensor([5e-324], dtype=torch.float32), torch.tensor([0.0])
    )
    assert torch.isfinite(kept).tolist() == [[False, True, False, False]]
    tokens, _ = Sampler(seed=0)(logits, [_seq("r", temperature=1.0, top_p=5e-324)])
    assert tokens == [1]
    assert sample_from_probs(torch.full((1, 4), float("nan")), torch.tensor([0.5])).item() <= 3


def test_inverse_cdf_samples_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    u[:2] = torch.tensor([0.0, 1.0 - 2**-24])  # the ends: the first token, and never the trailing zero
    draws = sample_from_probs(probs.expand(n, 6) * 3.0, u)  # rows need not sum to 1
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, probs, atol=0.01)
    assert freq[1] == freq[5] == 0 and draws[0] == 0 and draws[1] == 4


@pytest.mark.parametrize("q", [[0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.15, 0.05], [0.0, 0.0, 0.5, 0.5]])
def test_accepting_a_sampled_draft_with_min_1_p_over_q_keeps_p(q):
    """Draft tokens drawn from q, kept with probability min(1, p/q) or replaced by a draw from max(0, p - q):
    the kept tokens are distributed as p, and a replaced token never equals its draft."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor(q)
    n = 40000
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(q, n, replacement=True, generator=g)
    seqs = [_seq(f"r{i}", temperature=1.0) for i in range(n)]
    sampler = Sampler(seed=2)
    probs = p.expand(n, 4)
    drafts = [(int(t), q) for t in x]
    tokens = sampler._accept_or_resample(probs, sampler.draw(probs, seqs), seqs, drafts)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.01), freq
    kept = (tokens == x).float().mean().item()
    assert abs(kept - torch.minimum(p, q).sum().item()) < 0.01  # acceptance is 1 - TV(p, q)


def _seq(rid: str, **params) -> Sequence:
    return Sequence(rid, [1, 2, 3], SamplingParams(**params), arrival=0)


def test_seeded_rows_do_not_depend_on_batch_or_engine_seed():
    logits = torch.randn(3, V)
    b = Sampler(seed=2)(logits, [_seq("x"), _seq("a", seed=42), _seq("y", seed=7)])[0]
    solo = Sampler(seed=1)(logits[1:2], [_seq("a", seed=42)])[0]
    assert solo[0] == b[1]
    runs = [Sampler(seed=s)(logits, [_seq("p", seed=5), _seq("q", seed=5), _seq("r", seed=5)])[0] for s in (0, 9)]
    assert runs[0] == runs[1]


def test_greedy_rows_take_the_argmax_and_logprobs_are_raw():
    logits = torch.randn(2, V)
    tokens, logprobs = Sampler()(
        logits,
        [_seq("a", temperature=0, logprobs=True, top_logprobs=2, repetition_penalty=1.5), _seq("b", temperature=0)],
    )
    penalised = logits[0].clone()
    penalised[[1, 2, 3]] = torch.where(penalised[[1, 2, 3]] > 0, penalised[[1, 2, 3]] / 1.5, penalised[[1, 2, 3]] * 1.5)
    assert tokens == [penalised.argmax().item(), logits[1].argmax().item()]
    lp, top = logprobs[0]
    raw = logits[0].log_softmax(-1)
    assert abs(lp - raw[tokens[0]].item()) < 1e-6
    assert [t for t, _ in top] == raw.topk(2).indices.tolist()
    assert logprobs[1] is None
