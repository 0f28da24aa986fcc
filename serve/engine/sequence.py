"""One request's life inside the engine: its tokens, text, stop handling, timings and sinks.

Owned by the engine loop thread once enqueued; other threads only set `cancelled`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serve.engine.detokenize import Detokenizer, IncrementalText
from serve.engine.logits import RowLogits
from serve.engine.requests import GenerationParams, GenerationRequest, GenerationResult, TokenEvent, rows_of
from serve.engine.sampling import SamplingRow

SEED_STRIDE = 0x9E3779B97F4A7C15  # row j of a request samples with seed + j * stride (mod 2**63)

log = logging.getLogger("peftserve.engine")


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    params: GenerationParams  # validated, defaults resolved
    input_ids: list[int]
    seed: int | None
    deadline: float
    on_event: Callable[[TokenEvent], None] | None = None
    on_done: Callable[[GenerationResult | None, BaseException | None], None] | None = None
    # scheduling
    cost_tokens: int = 0  # input + soft prompt + max_new_tokens
    prefill_tokens: int = 0  # input + soft prompt
    skips: int = 0
    counted: set = field(default_factory=set)  # adapter keys whose cache hit/miss is recorded
    # adapters resolved at admission (a replaced adapter's newest version): one Term per adapter acting on
    # the row (serve/engine/combinations.py), and the device slots pinned for them, in the same order
    terms: tuple = ()
    slots: tuple[int, ...] = ()
    method: str = "base"  # metrics label (AdapterSpec.method_name, or a combination's kinds)
    resolved: list[dict] | None = None  # a combination: [{"id", "version", "weight"}] for the response
    # decoding
    sampling: SamplingRow | None = None
    proc: RowLogits | None = None  # logits processors (None: none apply)
    grammar: object | None = None  # the compiled grammar's matcher in its start state (each row copies it)
    group: object | None = None  # a request of several rows (serve/engine/groups.py): the rows share it
    index: int = 0  # which of its request's rows (outputs) this is
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    emitted_chars: int = 0
    text: str = ""  # decoded so far (cut at a stop sequence)
    decoding: IncrementalText = field(default_factory=IncrementalText)
    # lifecycle
    cancelled: bool = False
    done: bool = False
    error: BaseException | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float | None = None
    t_first: float | None = None

    @property
    def adapter(self) -> str | None:
        """The request's adapter name, or its combination's names joined by '+' (a label, never a lookup)."""
        m = self.request.merged_adapters
        return self.request.adapter if m is None else "+".join(m.ids)

    @property
    def wants_adapters(self) -> bool:
        return self.request.adapter is not None or self.request.merged_adapters is not None

    @property
    def key(self):
        """What the row runs, as one hashable: None (base), the adapter's key, or the combination's terms."""
        if not self.terms:
            return None
        return self.terms[0].key if len(self.terms) == 1 and self.terms[0].weight == 1.0 else self.terms

    @property
    def kind(self) -> str:
        if not self.terms:
            return "base"
        return self.terms[0].kind if len(self.terms) == 1 else "combination"

    @property
    def row(self) -> tuple | None:
        """The row's (kind, slot, weight) terms for RowAdapters.from_rows; None for a base row."""
        if not self.terms:
            return None
        return tuple((t.kind, slot, t.weight) for t, slot in zip(self.terms, self.slots, strict=True))

    @property
    def rows(self) -> int:
        """KV-cache rows this request takes once admitted (beams, or sampled candidates)."""
        return rows_of(self.params)

    @property
    def gone(self) -> bool:
        """Cancelled (its request's caller went away)."""
        return self.cancelled or (self.group is not None and self.group.owner.cancelled)

    def row_seed(self) -> int | None:
        if self.seed is None:
            return None
        return (self.seed + self.index * SEED_STRIDE) % 2**63

    def start(self, start_token: int, vocab: int) -> None:
        p = self.params
        gen = None
        if p.do_sample and p.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(self.row_seed())
        self.sampling = SamplingRow(p.do_sample, p.temperature, p.top_k, p.top_p, gen, p.typical_p)
        grammar = None
        if self.grammar is not None:
            from serve.engine.grammar import GrammarRow

            grammar = GrammarRow.start(self.grammar.deep_copy(), vocab)
        proc = RowLogits.of(p, start_token, grammar)
        self.proc = proc if proc.active else None

    def last_token(self, decoder_start: int) -> int:
        return self.tokens[-1] if self.tokens else decoder_start

    def append(self, token: int, logprob: float | None, eos_id: int, detok: Detokenizer,
               top: list[tuple[int, float]] | None = None) -> str | None:
        """Record one token, emit its event; return the finish reason if the sequence is now finished."""
        self.tokens.append(token)
        if logprob is not None and self.keeps_logprobs:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_tokens.append(top)
        reason = "eos" if token == eos_id else "length" if len(self.tokens) >= self.params.max_new_tokens else None
        piece = self.decoding.push(detok, token)
        if reason is not None:
            piece += self.decoding.flush(detok)
        stops = self.params.stop
        longest = max(map(len, stops), default=0)
        text = self.text + piece
        if stops and piece:  # only text that could end in a new match is searched
            start = max(0, len(self.text) - longest + 1)
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        self.text = text
        safe = len(text)
        if reason is None and stops:  # a stop sequence may be forming at the end: hold those characters back
            safe -= longest - 1
        delta = text[self.emitted_chars:safe] if safe > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, safe)
        sink = self.on_event if self.group is None else self.group.owner.on_event
        if sink is not None:
            event = TokenEvent(token_id=token, text=delta, logprob=logprob if self.params.logprobs else None,
                               index=len(self.tokens) - 1, sequence=self.index, top=top)
            try:
                sink(event)
            except Exception:  # noqa: BLE001 - the consumer is gone (e.g. its event loop closed)
                self.cancelled = True
        return reason

    @property
    def keeps_logprobs(self) -> bool:
        """Per-token log-probabilities are kept when asked for, and for best_of's ranking."""
        p = self.params
        return p.logprobs or (p.best_of or 1) > p.n

    def result(self, finish_reason: str) -> GenerationResult:
        now = time.perf_counter()
        timings = {"queue_s": (self.t_admit or now) - self.t_submit,
                   "ttft_s": (self.t_first or now) - self.t_submit, "total_s": now - self.t_submit}
        return GenerationResult(text=self.text, token_ids=list(self.tokens), finish_reason=finish_reason,
                                prompt_tokens=len(self.input_ids), generated_tokens=len(self.tokens),
                                logprobs=list(self.logprobs) if self.keeps_logprobs else None,
                                seed=self.seed, adapter=self.request.adapter, timings=timings,
                                adapters=self.resolved,
                                merge_strategy=None if self.resolved is None else
                                self.request.merged_adapters.merge_strategy,
                                top_tokens=list(self.top_tokens) if self.params.top_n_tokens else None)

    def clone_row(self, index: int) -> Sequence:
        """Another row of the same request (a beam, or a sampled candidate): same input, adapters and limits,
        its own decoding state. Results and events reach the request through the group."""
        return Sequence(request=self.request, params=self.params, input_ids=self.input_ids, seed=self.seed,
                        deadline=self.deadline, cost_tokens=self.cost_tokens, prefill_tokens=self.prefill_tokens,
                        terms=self.terms, slots=self.slots, method=self.method, resolved=self.resolved,
                        grammar=self.grammar, group=self.group, index=index, t_submit=self.t_submit)

    def finish(self, result: GenerationResult | None, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        if self.on_done is not None:
            try:
                self.on_done(result, error)
            except Exception:  # noqa: BLE001 - a vanished consumer must not break the batch
                log.warning("could not deliver the result of a request (its caller went away)")
