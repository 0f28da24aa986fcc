"""Beam search for one request, with HF `generate(num_beams=k)`'s semantics (transformers 5's vectorized beam
search): each step keeps the top 2k continuations over the k beams' accumulated log-probabilities; the best
k that did not end continue; the top-k candidates that end (EOS, or the length limit) compete for the k
finished slots with score / generated_length ** length_penalty; `early_stopping` True stops once k are
finished, False stops when the best running beam (scored at its current length) cannot beat the worst
finished one, "never" scores it at the longest possible length when length_penalty > 0.

The k beams are k rows of the continuous batch; this module only decides, per step, which row each beam
continues (`src`) and with which token. The batch loop reorders the rows' KV self-cache and per-row state
accordingly. Arithmetic is HF's, op for op, so tokens equal its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9


@dataclass
class Hypothesis:
    tokens: list[int]
    logprobs: list[float]
    score: float


class BeamSearch:
    def __init__(self, k: int, eos: int, max_new_tokens: int, length_penalty: float, early_stopping):
        self.k, self.eos = k, eos
        self.max_length = 1 + max_new_tokens  # HF counts the decoder start token
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.cur_len = 1
        self.running = torch.zeros(1, k)
        self.running[:, 1:] = NEG  # only beam 0's continuations count at the first step
        self.finished_scores = torch.full((1, k), NEG)
        self.finished: list[Hypothesis | None] = [None] * k
        self.is_finished = torch.zeros((1, k), dtype=torch.bool)
        self.improvable = torch.ones((1, 1), dtype=torch.bool)
        self.top_mask = torch.cat((torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)))
        self.done = False

    def step(self, scores: torch.Tensor, raw_logprobs: torch.Tensor, beams: list[tuple[list[int], list[float]]]
             ) -> tuple[list[int], list[int], list[float]]:
        """`scores` [k, vocab]: processed log-probabilities of each beam's next token; `raw_logprobs` the
        model's (reported per token); `beams`: each beam's (tokens, logprobs) so far. Returns, per beam slot j,
        the beam it continues, its new token and that token's raw log-probability; sets `done`."""
        k, vocab = self.k, scores.shape[-1]
        acc = (scores.float() + self.running[0, :, None]).reshape(1, -1)
        top_lp, top_idx = torch.topk(acc, k=2 * k)
        from_beam, token = top_idx // vocab, top_idx % vocab
        hits = (token == self.eos) | (self.cur_len + 1 >= self.max_length)
        # e. the best k continuations that did not end keep running
        run_lp = top_lp + hits.to(torch.float32) * NEG
        keep = torch.topk(run_lp, k=k)[1]
        self.running = torch.take_along_dim(run_lp, keep, dim=1)
        # f. ended continuations among the top k compete for the finished slots
        ended = hits & self.top_mask[None, :]
        fin = top_lp / ((self.cur_len + 1 - 1) ** self.length_penalty)
        full = torch.all(self.is_finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        fin += full.to(torch.float32) * NEG
        fin += (~self.improvable).to(torch.float32) * NEG
        fin += (~ended) * NEG
        merged_scores = torch.cat((self.finished_scores, fin), dim=1)
        merged_finished = torch.cat((self.is_finished, ended), dim=1)
        pick = torch.topk(merged_scores, k=k)[1]
        fb, ft = from_beam[0].tolist(), token[0].tolist()
        raw = raw_logprobs[from_beam[0], token[0]].tolist()
        self.finished_scores = torch.take_along_dim(merged_scores, pick, dim=1)
        self.is_finished = torch.take_along_dim(merged_finished, pick, dim=1)
        finished = []
        for i, score in zip(pick[0].tolist(), self.finished_scores[0].tolist(), strict=True):
            if i < k:  # an earlier finished slot (or an empty one) stays
                h = self.finished[i]
            else:  # a candidate of this step: only the picked ones are built
                c = i - k
                h = Hypothesis(beams[fb[c]][0] + [ft[c]], beams[fb[c]][1] + [raw[c]], 0.0)
            if h is not None:
                h.score = score
            finished.append(h)
        self.finished = finished
        # g. can running beams still improve on the finished ones?
        self.cur_len += 1
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_length - 1
        else:
            best_len = self.cur_len - 1
        best_possible = self.running[:, :1] / (best_len ** self.length_penalty)
        worst = torch.where(self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], NEG)
        self.improvable = self.improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
        open_beam = ~(torch.all(self.is_finished) & (self.early_stopping is True))
        self.done = not bool(torch.any(self.improvable) & open_beam & ~torch.all(hits))
        kept = keep[0].tolist()
        return [fb[i] for i in kept], [ft[i] for i in kept], [raw[i] for i in kept]

    def best(self, count: int) -> list[Hypothesis]:
        """The `count` best finished hypotheses, best first (HF's `sequences[:num_return_sequences]`)."""
        return [h for h in self.finished[:count] if h is not None]
