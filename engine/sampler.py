"""Turns the last-position logits of a batch of sequences into next tokens (and their logprobs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.sampling import apply_penalties, apply_top_k_top_p_min_p, sample_from_probs
from engine.outputs import TokenLogprob
from engine.sequence import Sequence


def _column(seqs: list[Sequence], name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(s.params, name) for s in seqs], dtype=dtype, device=device)


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row: (logprob of `chosen`, k most likely (token, logprob)); one transfer for the batch."""
    return TopLogprobs.of(logprobs, chosen, k).read()


@dataclass
class TopLogprobs:
    """`top_logprobs` before its transfer: the device tensors it reads."""

    picked: torch.Tensor
    values: torch.Tensor | None
    ids: torch.Tensor | None

    @classmethod
    def of(cls, logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> TopLogprobs:
        picked = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        if k == 0:
            return cls(picked, None, None)
        values, ids = logprobs.topk(k, dim=-1)
        return cls(picked, values, ids)

    def read(self) -> list[TokenLogprob]:
        picked = self.picked.tolist()
        if self.ids is None:
            return [(p, []) for p in picked]
        return [(p, list(zip(i, v))) for p, i, v in zip(picked, self.ids.tolist(), self.values.tolist())]


@dataclass
class Sampled:
    """A step's next tokens still on the device (overlap scheduling reads them a step later, engine/overlap.py)."""

    tokens: torch.Tensor
    wanted: list[int]  # rows that report logprobs
    top: TopLogprobs | None
    top_k: list[int]  # per wanted row, how many alternatives it reports

    def read(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The tokens and reported logprobs, as lists: the step's one wait for the device."""
        logprobs: list[TokenLogprob | None] = [None] * len(self.tokens)
        if self.top is not None:
            for i, k, (lp, top) in zip(self.wanted, self.top_k, self.top.read()):
                logprobs[i] = (lp, top[:k])
        return self.tokens.tolist(), logprobs


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        # Unseeded requests draw from one engine-wide stream, so a run is reproducible from cfg.seed.
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        raw: torch.Tensor | None = None,
        drafts: list[tuple[int, torch.Tensor] | None] | None = None,
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Next tokens from `logits`; reported logprobs come from `raw` (the model's own, default `logits`).
        `drafts` holds, per row, a token a draft model sampled for this position and the distribution it was
        drawn from (None where there is none): such a row keeps it or resamples (`_accept_or_resample`)."""
        return self.sample(logits, seqs, raw, drafts).read()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        raw: torch.Tensor | None = None,
        drafts: list[tuple[int, torch.Tensor] | None] | None = None,
    ) -> Sampled:
        """`__call__` without reading its result from the device."""
        device = logits.device
        params = [s.params for s in seqs]
        raw = logits if raw is None else raw
        if any(p.penalised for p in params):
            logits = self._penalise(logits, seqs)
        if any(p.logit_bias for p in params):
            logits = self._bias(logits, params)

        # Which stages run is decided from the parameters on the host: a device-side test would wait for the
        # step to finish before the next could be prepared.
        tokens = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            probs = self.distribution(logits, seqs)
            sampled = self.draw(probs, seqs)
            if drafts is not None and any(d is not None for d in drafts):
                sampled = self._accept_or_resample(probs, sampled, seqs, drafts)
            greedy = torch.tensor([p.greedy for p in params], device=device)
            tokens = torch.where(greedy, tokens, sampled)

        wanted = [i for i, p in enumerate(params) if p.logprobs]
        if not wanted:
            return Sampled(tokens, [], None, [])
        # Reported logprobs are the model's own distribution, before penalties and temperature.
        rows = torch.tensor(wanted, device=device)
        k = max(params[i].top_logprobs for i in wanted)
        top = TopLogprobs.of(raw[rows].log_softmax(dim=-1), tokens[rows], k)
        return Sampled(tokens, wanted, top, [params[i].top_logprobs for i in wanted])

    def distribution(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """What a sampled row draws from: softmax of its logits at its temperature, after top-k/top-p/min-p."""
        device = logits.device
        params = [s.params for s in seqs]
        temperature = _column(seqs, "temperature", torch.float32, device).clamp(min=1e-5).unsqueeze(1)
        filtered = apply_top_k_top_p_min_p(
            logits.float() / temperature,
            _column(seqs, "top_k", torch.long, device),
            _column(seqs, "top_p", torch.float32, device),
            _column(seqs, "min_p", torch.float32, device),
            top_k_or_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
            min_p_used=any(p.min_p > 0 for p in params),
        )
        return filtered.softmax(dim=-1)

    def draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row from `probs`, with one uniform per row (a seeded request's from its generator)."""
        return sample_from_probs(probs, self._uniform(seqs, probs.device))

    def _accept_or_resample(
        self,
        probs: torch.Tensor,
        sampled: torch.Tensor,
        seqs: list[Sequence],
        drafts: list[tuple[int, torch.Tensor] | None],
    ) -> torch.Tensor:
        """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for a draft token x drawn from q: keep
        x with probability min(1, p(x) / q(x)), else draw from max(0, p - q) renormalised. Either way the token
        is distributed as p, and a rejected x is never drawn again (its residual is 0), so the caller's "the
        token equals the draft" is the acceptance test."""
        device = probs.device
        rows = [i for i, d in enumerate(drafts) if d is not None and not seqs[i].params.greedy]
        if not rows:
            return sampled
        index = torch.tensor(rows, device=device)
        x = torch.tensor([drafts[i][0] for i in rows], device=device).unsqueeze(1)
        p = probs[index]
        q = torch.stack([drafts[i][1] for i in rows]).to(device=device, dtype=p.dtype)
        q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))  # a draft vocabulary may be shorter
        ratio = p.gather(1, x).squeeze(1) / q.gather(1, x).squeeze(1)
        residual = (p - q).clamp(min=0)
        # p <= q everywhere means p == q up to rounding; the draft is then kept but for a rounding's chance.
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
        owners = [seqs[i] for i in rows]
        chosen = torch.where(self._uniform(owners, device) < ratio, x.squeeze(1), self.draw(residual, owners))
        return sampled.index_copy(0, index, chosen)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if device.type != self.generator.device.type:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self.generator

    def _uniform(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        """U(0, 1) per row, drawn where the logits are (one host-to-device copy per step would cost more on a
        GPU); a seeded request's from its own (host) generator."""
        u = torch.rand(len(seqs), device=device, generator=self._generator_for(device))
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(1, generator=s.generator).to(device)
        return u

    @staticmethod
    def _bias(logits: torch.Tensor, params: list) -> torch.Tensor:
        """OpenAI's logit_bias: each row's entries added to its logits (in a copy)."""
        rows = [i for i, p in enumerate(params) for _ in (p.logit_bias or {})]
        cols = [t for p in params for t in (p.logit_bias or {})]
        values = [v for p in params for v in (p.logit_bias or {}).values()]
        index = torch.tensor([rows, cols], device=logits.device)
        bias = torch.tensor(values, dtype=logits.dtype, device=logits.device)
        return logits.index_put((index[0], index[1]), bias, accumulate=True)

    @staticmethod
    def _penalise(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        b, vocab = logits.shape
        device = logits.device
        longest = max(s.num_output_tokens for s in seqs)
        counts = torch.zeros(b, vocab, device=device)
        if longest:
            out = torch.zeros(b, longest, dtype=torch.long, device=device)
            valid = torch.zeros(b, longest, device=device)
            for i, s in enumerate(seqs):
                ids = s.output_token_ids
                out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                valid[i, : len(ids)] = 1
            counts.scatter_add_(1, out, valid)
        seen = counts > 0
        for i, s in enumerate(seqs):
            if s.params.repetition_penalty != 1:
                seen[i, torch.tensor(s.prompt_token_ids, dtype=torch.long, device=device)] = True
        return apply_penalties(
            logits,
            counts,
            seen,
            _column(seqs, "presence_penalty", torch.float32, device),
            _column(seqs, "frequency_penalty", torch.float32, device),
            _column(seqs, "repetition_penalty", torch.float32, device),
        )
