"""Per-row logits processing for the running batch, before the token choice (serve/engine/sampling.py).

Each row carries its own settings (`RowLogits`, from its GenerationParams). `LogitsPipeline.process` applies
each feature once over the rows that use it (gather those rows, apply, scatter back), in HF `generate`'s
processor order: logit bias (HF's SequenceBiasLogitsProcessor with one-token sequences), repetition penalty
(HF/TGI: a seen token's logit divided by the penalty when positive, multiplied when negative; the decoder
start token counts as seen, as in HF), OpenAI's frequency and presence penalties (minus penalty x count,
minus penalty once seen; generated tokens only), no-repeat n-grams, minimum new tokens (EOS masked), then
the grammar mask. A batch where no row uses a feature pays nothing for it.

Penalties are sparse: a row keeps {token: count} of what it generated (a few hundred entries at most, not a
vocabulary-wide row), so a step gathers only the seen (row, token) scores, penalizes them and scatters them back
- O(seen tokens), not O(rows x vocab). The state lives on the row and moves with it (the KV cache's compaction
moves rows, beams fork their parent's). Grammar masks for the next step are computed on a worker thread while
the model step runs (`observe` starts them, `process` waits for them).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from serve.engine.grammar import GrammarRow, mask_rows

NEG_INF = float("-inf")


@dataclass
class RowLogits:
    repetition: float = 1.0
    frequency: float = 0.0
    presence: float = 0.0
    ngram: int = 0
    min_new: int = 0
    bias: tuple[list[int], list[float]] | None = None
    grammar: GrammarRow | None = None
    # no_repeat_ngram_size: (n-1)-token prefix -> tokens that followed it, over decoder start + generated
    ngrams: dict = field(default_factory=dict)
    history: list[int] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # generated token -> count (penalties)

    @classmethod
    def of(cls, params, start_token: int, grammar: GrammarRow | None = None) -> RowLogits:
        bias = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            bias = (ids, [float(params.logit_bias[t]) for t in ids])
        row = cls(params.repetition_penalty, params.frequency_penalty, params.presence_penalty,
                  params.no_repeat_ngram_size, params.min_new_tokens, bias, grammar)
        if row.ngram:
            row.note(start_token)
        return row

    @property
    def counts(self) -> bool:
        return self.repetition != 1.0 or self.frequency != 0.0 or self.presence != 0.0

    @property
    def active(self) -> bool:
        return self.counts or bool(self.ngram) or self.min_new > 0 or self.bias is not None or self.grammar is not None

    def note(self, token: int) -> None:
        """Record the next token of the decoder sequence for the n-gram ban."""
        h = self.history
        h.append(token)
        n = self.ngram
        if len(h) >= n:
            self.ngrams.setdefault(tuple(h[len(h) - n:-1]), set()).add(token)

    def banned(self) -> set[int]:
        """Tokens that would repeat an n-gram (HF's NoRepeatNGramLogitsProcessor)."""
        h, n = self.history, self.ngram
        if len(h) + 1 < n:
            return set()
        return self.ngrams.get(tuple(h[len(h) - n + 1:]), set())

    def fork(self) -> RowLogits:
        """An independent copy for a beam that continues this row."""
        return RowLogits(self.repetition, self.frequency, self.presence, self.ngram, self.min_new, self.bias,
                         None if self.grammar is None else self.grammar.copy(),
                         {k: set(v) for k, v in self.ngrams.items()}, list(self.history), dict(self.seen))


class LogitsPipeline:
    """The running rows' logits processing; owned by the batch loop thread."""

    def __init__(self, start_token: int, eos_token: int):
        self.start, self.eos = start_token, eos_token
        self._pending: Future | None = None
        self._worker: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def process(self, logits: torch.Tensor, procs: list[RowLogits], generated: list[int]) -> torch.Tensor:
        """Processed scores [n, vocab] for rows [0, n) (`generated`: each row's token count so far); `logits`
        itself when no row processes anything."""
        active = [i for i, p in enumerate(procs) if p is not None and p.active]
        if not active:
            return logits
        self.wait()
        scores = logits.clone(memory_format=torch.contiguous_format)
        dev = scores.device
        biased = [i for i in active if procs[i].bias is not None]
        if biased:
            rows = [i for i in biased for _ in procs[i].bias[0]]
            ids = [t for i in biased for t in procs[i].bias[0]]
            values = [v for i in biased for v in procs[i].bias[1]]
            scores.index_put_((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                              torch.tensor(values, device=dev, dtype=scores.dtype), accumulate=True)
        counted = [i for i in active if procs[i].counts]
        if counted:
            self._penalize(scores, procs, counted)
        bans = [(i, t) for i in active if procs[i].ngram for t in procs[i].banned()]
        bans += [(i, self.eos) for i in active if generated[i] < procs[i].min_new]
        if bans:
            rows, ids = zip(*bans, strict=True)
            scores[torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)] = NEG_INF
        grammar = [i for i in active if procs[i].grammar is not None]
        if grammar:
            mask_rows(scores, grammar, [procs[i].grammar.mask for i in grammar], self.eos)
        if bans or grammar:  # features that disagree (a finished grammar, min_new_tokens) leave nothing: end
            dead = torch.isneginf(scores[:len(procs)]).all(dim=-1)
            if bool(dead.any()):
                scores[dead.nonzero()[:, 0], self.eos] = 0.0
        return scores

    def _penalize(self, scores: torch.Tensor, procs: list[RowLogits], rows: list[int]) -> None:
        """The seen (row, token) scores, gathered flat: repetition (seen, decoder start included), then
        frequency x count and presence once seen."""
        vocab = scores.shape[-1]
        flat_idx, counts, rep, freq, pres = [], [], [], [], []
        for i in rows:
            p = self._pairs(procs[i])
            for tok, c in p:
                flat_idx.append(i * vocab + tok)
                counts.append(c)
            m = len(p)
            q = procs[i]
            rep += [q.repetition] * m
            freq += [q.frequency] * m
            pres += [q.presence] * m
        if not flat_idx:
            return
        dev, dt = scores.device, scores.dtype
        idx = torch.tensor(flat_idx, device=dev, dtype=torch.long)
        flat = scores.view(-1)
        x = flat.index_select(0, idx)
        r = torch.tensor(rep, device=dev, dtype=dt)
        x = torch.where(x < 0, x * r, x / r)
        c = torch.tensor(counts, device=dev, dtype=dt)
        x = x - torch.tensor(freq, device=dev, dtype=dt) * c - torch.tensor(pres, device=dev, dtype=dt) * (c > 0)
        flat.index_copy_(0, idx, x)

    def _pairs(self, p: RowLogits) -> list[tuple[int, int]]:
        """A row's (token, count) pairs to penalize: what it generated, plus the decoder start token (count 0:
        only the repetition penalty sees it, as HF's does) when it uses one."""
        pairs = list(p.seen.items())
        if p.repetition != 1.0 and self.start not in p.seen:
            pairs.append((self.start, 0))
        return pairs

    def observe(self, procs: list[RowLogits], tokens: list[int]) -> None:
        """The rows' chosen tokens: counts and n-grams now; grammar masks for the next step on the worker."""
        grammar = []
        for p, t in zip(procs, tokens, strict=True):
            if p is None:
                continue
            if p.counts:
                p.seen[t] = p.seen.get(t, 0) + 1
            if p.ngram:
                p.note(t)
            if p.grammar is not None:
                grammar.append((p.grammar, t))
        if grammar:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="peftserve-grammar")
            self.wait()
            self._pending = self._worker.submit(_advance, grammar)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def _advance(rows: list[tuple[GrammarRow, int]]) -> None:
    for row, token in rows:
        row.advance(token)
