"""A request that occupies several rows of the batch: n / best_of sampled candidates, or k beams.

The request's own Sequence is row 0 (it was queued, scheduled and holds the caller's callbacks); rows
1..k-1 are clones (`Sequence.clone_row`) made at admission, sharing its encoder output, adapters and
limits. Sampled candidates decode independently (each its own seed) and leave the batch as each ends; the
request finishes when the last one does, best_of candidates ranked by cumulative log-probability. Beams
step together (serve/engine/beams.py) and leave together.
"""

from __future__ import annotations

from dataclasses import replace

from serve.engine.beams import BeamSearch
from serve.engine.detokenize import Detokenizer, IncrementalText
from serve.engine.requests import GenerationResult, SequenceOutput, TokenEvent


class RowGroup:
    def __init__(self, owner, eos: int):
        p = owner.params
        self.owner, self.eos = owner, eos
        owner.group = self
        self.rows = [owner] + [owner.clone_row(j) for j in range(1, owner.rows)]
        self.results: dict[int, GenerationResult] = {}
        self.search = None
        if p.num_beams > 1:
            self.search = BeamSearch(p.num_beams, eos, p.max_new_tokens, p.length_penalty, p.early_stopping)

    # ---- sampled candidates ----------------------------------------------------------------------------
    def row_finished(self, seq, result: GenerationResult) -> GenerationResult | None:
        """A candidate ended; the request's result once every candidate has."""
        self.results[seq.index] = result
        if len(self.results) < len(self.rows):
            return None
        p = self.owner.params
        ranked = [self.results[j] for j in range(len(self.rows))]
        scores = [sum(r.logprobs or []) for r in ranked]
        order = list(range(len(ranked)))
        if (p.best_of or 1) > p.n:
            order.sort(key=lambda j: -scores[j])
        chosen = order[:p.n]
        keep_lp = p.logprobs
        outputs = [SequenceOutput(text=ranked[j].text, token_ids=ranked[j].token_ids,
                                  finish_reason=ranked[j].finish_reason,
                                  logprobs=ranked[j].logprobs if keep_lp else None, score=scores[j],
                                  top_tokens=ranked[j].top_tokens) for j in chosen]
        first = ranked[chosen[0]]
        return replace(first, logprobs=first.logprobs if keep_lp else None, sequences=outputs,
                       timings=result.timings)

    # ---- beams -------------------------------------------------------------------------------------
    def beam_result(self, detok: Detokenizer) -> GenerationResult:
        """The search's best hypotheses as the request's result; a stream gets the best one's tokens now."""
        owner, p = self.owner, self.owner.params
        outputs = []
        for h in self.search.best(p.num_return_sequences):
            text = IncrementalText()
            pieces = [text.push(detok, t) for t in h.tokens]
            pieces.append(text.flush(detok))
            reason = "eos" if h.tokens and h.tokens[-1] == self.eos else "length"
            outputs.append((SequenceOutput(text="".join(pieces), token_ids=h.tokens, finish_reason=reason,
                                           logprobs=h.logprobs if p.logprobs else None, score=h.score), pieces))
        best, _ = outputs[0]
        if owner.on_event is not None:  # a stream gets each returned beam's tokens now, as output j
            try:
                for j, (out, pieces) in enumerate(outputs):
                    for i, token in enumerate(out.token_ids):
                        piece = pieces[i] + (pieces[-1] if i == len(out.token_ids) - 1 else "")
                        lp = out.logprobs[i] if out.logprobs else None
                        owner.on_event(TokenEvent(token_id=token, text=piece, logprob=lp, index=i, sequence=j))
            except Exception:  # noqa: BLE001 - the consumer is gone
                pass
        owner.tokens, owner.text = list(best.token_ids), best.text
        owner.logprobs = list(best.logprobs or [])
        result = owner.result(best.finish_reason)
        return replace(result, score=best.score,
                       sequences=[o for o, _ in outputs] if len(outputs) > 1 else None)
