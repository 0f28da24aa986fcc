"""Choosing each row's next token from its processed scores: greedy, or a draw from its own generator after
temperature, top-k, top-p and typical-p; plus the log-probabilities the response reports.

The model step (serve/engine/decode.py) returns raw logits; serve/engine/logits.py applies the per-row
processors (penalties, n-gram bans, minimum length, logit bias, grammar masks) first, as HF's `generate`
applies its logits processors before its warpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    typical_p: float = 1.0

    @property
    def draws(self) -> bool:
        return self.do_sample and self.temperature > 0


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  typical_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p), then typical-p filtering of one row's logits [vocab]
    (HF's warper order)."""
    x = logits / max(temperature, 1e-6)
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, NEG_INF)
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass before it already reaches top_p (always keeps the first)
        drop = (probs.cumsum(-1) - probs) >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG_INF)
    if typical_p < 1.0:
        x = typical_filter(x[None], torch.tensor([typical_p]))[0]
    return x


def typical_filter(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.), HF's TypicalLogitsWarper over rows [m, vocab] with a mass per
    row: keep the tokens whose surprisal is closest to the entropy until their probability reaches `mass`."""
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-logp - entropy)
    sorted_shift, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None].to(cumulative.device)).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    drop = sorted_shift > sorted_shift.gather(1, last[:, None])
    drop[..., :1] = False  # min_tokens_to_keep = 1
    return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def sample(logits: torch.Tensor, rows: list[SamplingRow], want_logprobs: bool, scores: torch.Tensor | None = None
           ) -> tuple[list[int], list[float] | None]:
    """Next token per row: greedy rows argmax; sampled rows draw with their own generator.

    `scores` are the processed logits the choice is made from (default: `logits`). Each row's draw depends
    only on its own scores and generator, so a fixed seed gives the same text alone or in any batch.
    Log-probabilities are of the chosen token under the model's distribution (`logits`, unprocessed).
    """
    scores = logits if scores is None else scores
    chosen = scores.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r is not None and r.draws]
    if sampled:
        chosen = chosen.clone()
        for i in sampled:
            r = rows[i]
            probs = torch.softmax(filter_logits(scores[i], r.temperature, r.top_k, r.top_p, r.typical_p), dim=-1)
            chosen[i] = torch.multinomial(probs.cpu(), 1, generator=r.generator)[0]
    logprobs = None
    if want_logprobs:
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None].to(logits.device))[:, 0].tolist()
    return chosen.tolist(), logprobs


def top_alternatives(logits: torch.Tensor, rows: list[int], k: list[int]) -> list[list[tuple[int, float]]]:
    """The k most likely tokens and their log-probabilities under the model's distribution, for each of
    `rows` (TGI's top_n_tokens, OpenAI's logprobs: k): one top-k over the rows that ask, at their widest k."""
    if not rows:
        return []
    widest = max(k)
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
    values, ids = torch.topk(lp, min(widest, lp.shape[-1]), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[j][:k[j]], values[j][:k[j]], strict=True)) for j in range(len(rows))]
