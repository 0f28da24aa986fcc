"""Request and result types of the in-process API, and their validation against an EngineConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serve.engine.config import EngineConfig
from serve.engine.errors import RequestValidationError

FINISH_REASONS = ("length", "eos", "stop")


@dataclass
class GenerationParams:
    max_new_tokens: int | None = None  # None: EngineConfig.default_max_new_tokens
    do_sample: bool = False
    temperature: float = 1.0  # with do_sample; 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None  # sampling seed; None: a random one, reported in the result
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    # logits processors (serve/engine/logits.py), per row
    repetition_penalty: float = 1.0  # HF/TGI: seen tokens' logits divided (positive) or multiplied (negative)
    frequency_penalty: float = 0.0  # OpenAI: minus penalty x times the token was generated
    presence_penalty: float = 0.0  # OpenAI: minus penalty once a token was generated
    no_repeat_ngram_size: int = 0  # HF: no n-gram of this size twice (0: off)
    min_new_tokens: int = 0  # EOS is masked until this many tokens were generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    typical_p: float = 1.0  # with do_sample: locally typical sampling mass
    grammar: dict | None = None  # {"type": "json" | "regex" | "json_object", "value": ..., "whitespace": bool}
    # several outputs
    num_beams: int = 1  # beam search over this many rows (HF semantics)
    length_penalty: float = 1.0  # beam scores divided by length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never" (HF)
    num_return_sequences: int = 1  # beam search: the best this many beams
    n: int = 1  # sampled outputs returned (OpenAI n)
    best_of: int | None = None  # sampled candidates, the n best by cumulative log-probability returned
    top_n_tokens: int = 0  # the most likely alternatives per generated token, with log-probabilities


@dataclass
class MergedAdapters:
    """Several adapters on one row (LoRAX's `parameters.merged_adapters`). `linear`: each adapter acts on
    the row directly, LoRA deltas weighted (adapters/combine.py); `ties`, `dare_linear`, `dare_ties`: one
    LoRA merged by PEFT's functions, built once per distinct combination and cached."""

    ids: list[str]
    weights: list[float] | None = None  # None: 1 for every adapter
    merge_strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    def resolved_weights(self) -> list[float]:
        return [1.0] * len(self.ids) if self.weights is None else list(self.weights)


@dataclass
class GenerationRequest:
    inputs: str
    adapter: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str | None = None
    merged_adapters: MergedAdapters | None = None  # instead of `adapter`: several adapters on this row


@dataclass
class TokenEvent:
    """One generated token. `text` is the newly decoded text (may be "" while a stop sequence is
    possibly forming, or for special tokens); concatenating `text` over events gives the final text.
    `sequence`: which output it belongs to (n > 1); `top`: the most likely alternatives (top_n_tokens)."""

    token_id: int
    text: str
    logprob: float | None
    index: int
    sequence: int = 0
    top: list[tuple[int, float]] | None = None


@dataclass
class SequenceOutput:
    """One of several outputs of a request (n, best_of, beam search's num_return_sequences)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    score: float  # cumulative log-probability (sampling) or length-penalized beam score
    top_tokens: list[list[tuple[int, float]]] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids; includes the EOS id when finish_reason == "eos"
    finish_reason: str  # "length" | "eos" | "stop"
    prompt_tokens: int  # input tokens (soft-prompt tokens not counted)
    generated_tokens: int
    logprobs: list[float] | None
    seed: int | None
    adapter: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, ttft_s, total_s
    # a combination: what it resolved to, [{"id", "version", "weight"}], and its merge strategy
    adapters: list[dict] | None = None
    merge_strategy: str | None = None
    # top_n_tokens: per generated token, the most likely alternatives [(token id, log-probability)]
    top_tokens: list[list[tuple[int, float]]] | None = None
    # several outputs (n > 1, best_of, beams): all of them, best first; text/token_ids above are the first
    sequences: list[SequenceOutput] | None = None
    score: float | None = None  # beam search: the first sequence's beam score


def _int(field_name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestValidationError(field_name, f"must be an integer, got {value!r}")
    return value


def _float(field_name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestValidationError(field_name, f"must be a finite number, got {value!r}")
    return float(value)


def validate_params(p: GenerationParams, cfg: EngineConfig) -> GenerationParams:
    """Resolve defaults and check ranges; raises RequestValidationError naming the field."""
    mnt = cfg.resolved_default_max_new_tokens() if p.max_new_tokens is None else _int("params.max_new_tokens",
                                                                            p.max_new_tokens)
    if not 1 <= mnt <= cfg.max_new_tokens_cap:
        raise RequestValidationError("params.max_new_tokens",
                                     f"must be between 1 and {cfg.max_new_tokens_cap}, got {mnt}")
    temperature = _float("params.temperature", p.temperature)
    if temperature < 0:
        raise RequestValidationError("params.temperature", f"must be >= 0, got {temperature}")
    top_p = _float("params.top_p", p.top_p)
    if not 0 < top_p <= 1:
        raise RequestValidationError("params.top_p", f"must be in (0, 1], got {top_p}")
    top_k = _int("params.top_k", p.top_k)
    if top_k < 0:
        raise RequestValidationError("params.top_k", f"must be >= 0 (0 disables it), got {top_k}")
    if p.seed is not None:
        seed = _int("params.seed", p.seed)
        if not 0 <= seed < 2**63:
            raise RequestValidationError("params.seed", f"must be in [0, 2**63), got {seed}")
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    if len(stop) > cfg.max_stop_sequences:
        raise RequestValidationError("params.stop", f"at most {cfg.max_stop_sequences} stop sequences, "
                                                    f"got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise RequestValidationError("params.stop", "stop sequences must be non-empty strings")
        if len(s) > cfg.max_stop_chars:
            raise RequestValidationError("params.stop", f"a stop sequence may have at most "
                                                        f"{cfg.max_stop_chars} characters")
    if not isinstance(p.do_sample, bool) or not isinstance(p.logprobs, bool):
        raise RequestValidationError("params.do_sample" if not isinstance(p.do_sample, bool)
                                     else "params.logprobs", "must be true or false")
    return GenerationParams(max_new_tokens=mnt, do_sample=p.do_sample, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=p.seed, stop=stop, logprobs=p.logprobs,
                            **_processors(p, mnt), **_outputs(p, cfg, stop))


def _processors(p: GenerationParams, max_new_tokens: int) -> dict:
    rep = _float("params.repetition_penalty", p.repetition_penalty)
    if rep <= 0:
        raise RequestValidationError("params.repetition_penalty", f"must be > 0 (1.0: off), got {rep}")
    out = {"repetition_penalty": rep}
    for name in ("frequency_penalty", "presence_penalty"):
        v = _float(f"params.{name}", getattr(p, name))
        if not -2.0 <= v <= 2.0:
            raise RequestValidationError(f"params.{name}", f"must be between -2.0 and 2.0 (0: off), got {v}")
        out[name] = v
    ngram = _int("params.no_repeat_ngram_size", p.no_repeat_ngram_size)
    if ngram < 0:
        raise RequestValidationError("params.no_repeat_ngram_size", f"must be >= 0 (0: off), got {ngram}")
    least = _int("params.min_new_tokens", p.min_new_tokens)
    if not 0 <= least <= max_new_tokens:
        raise RequestValidationError("params.min_new_tokens", f"must be between 0 and max_new_tokens "
                                                              f"({max_new_tokens}), got {least}")
    typical = _float("params.typical_p", p.typical_p)
    if not 0 < typical <= 1:
        raise RequestValidationError("params.typical_p", f"must be in (0, 1] (1: off), got {typical}")
    out.update(no_repeat_ngram_size=ngram, min_new_tokens=least, typical_p=typical)
    return out


def _outputs(p: GenerationParams, cfg: EngineConfig, stop: list[str]) -> dict:
    """Beams, n / best_of, alternatives, logit bias and grammar: ranges against the engine's caps. Token ids
    (logit_bias) and grammars are checked against the tokenizer by the engine (serve/engine/core.py)."""
    beams = _int("params.num_beams", p.num_beams)
    if not 1 <= beams <= cfg.max_beams:
        raise RequestValidationError("params.num_beams", f"must be between 1 and {cfg.max_beams} (this server's "
                                                         f"max_beams), got {beams}")
    length_penalty = _float("params.length_penalty", p.length_penalty)
    early = p.early_stopping
    if early not in (True, False, "never"):
        raise RequestValidationError("params.early_stopping", f"must be true, false or \"never\", got {early!r}")
    n = _int("params.n", p.n)
    best_of = n if p.best_of is None else _int("params.best_of", p.best_of)
    if not 1 <= n <= cfg.max_n:
        raise RequestValidationError("params.n", f"must be between 1 and {cfg.max_n} (this server's max_n), got {n}")
    if not n <= best_of <= cfg.max_n:
        raise RequestValidationError("params.best_of", f"must be between n ({n}) and {cfg.max_n} (this server's "
                                                       f"max_n), got {best_of}")
    ret = _int("params.num_return_sequences", p.num_return_sequences)
    if beams > 1:
        ret = max(ret, n)  # OpenAI's n with beams: that many of the beams
        if not 1 <= ret <= beams:
            raise RequestValidationError("params.num_return_sequences", f"must be between 1 and num_beams "
                                                                        f"({beams}), got {ret}")
        if best_of > n:
            raise RequestValidationError("params.best_of", "best_of picks among sampled candidates; with "
                                                           "num_beams > 1 use num_return_sequences")
        if p.do_sample and p.temperature > 0:
            raise RequestValidationError("params.num_beams", "beam search is deterministic here: set do_sample "
                                                             "false (or temperature 0) with num_beams > 1")
        if stop:
            raise RequestValidationError("params.stop", "stop sequences are not supported with num_beams > 1")
    elif ret != 1:
        raise RequestValidationError("params.num_return_sequences", "needs num_beams > 1 (use n for sampling)")
    if best_of * beams > cfg.max_batch_rows:
        raise RequestValidationError("params.num_beams" if beams > 1 else "params.best_of",
                                     f"n x num_beams = {best_of} x {beams} rows exceeds this server's row budget "
                                     f"(max_batch_rows={cfg.max_batch_rows})")
    top = _int("params.top_n_tokens", p.top_n_tokens)
    if not 0 <= top <= cfg.max_top_n_tokens:
        raise RequestValidationError("params.top_n_tokens", f"must be between 0 and {cfg.max_top_n_tokens} (this "
                                                            f"server's max_top_n_tokens), got {top}")
    if top and beams > 1:
        raise RequestValidationError("params.top_n_tokens", "alternatives per token are not reported for beam "
                                                            "search (num_beams > 1)")
    bias = None
    if p.logit_bias:
        if not isinstance(p.logit_bias, dict):
            raise RequestValidationError("params.logit_bias", "must map token ids to numbers")
        if len(p.logit_bias) > cfg.max_logit_bias:
            raise RequestValidationError("params.logit_bias", f"at most {cfg.max_logit_bias} tokens (this server's "
                                                              f"max_logit_bias), got {len(p.logit_bias)}")
        bias = {}
        for k, v in p.logit_bias.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise RequestValidationError("params.logit_bias", f"keys are token ids, got {k!r}") from None
            value = _float("params.logit_bias", v)
            if not -100 <= value <= 100:
                raise RequestValidationError("params.logit_bias", f"biases are between -100 and 100, got {value}")
            bias[tok] = value
    grammar = p.grammar
    if grammar is not None:
        from serve.engine.grammar import check_grammar_shape

        grammar = check_grammar_shape(grammar, cfg.max_grammar_bytes)
    return {"num_beams": beams, "length_penalty": length_penalty, "early_stopping": early,
            "num_return_sequences": ret if beams > 1 else 1, "n": n, "best_of": best_of if beams == 1 else None,
            "top_n_tokens": top, "logit_bias": bias, "grammar": grammar}


def check_vocabulary(p: GenerationParams, vocab: int, grammars) -> object | None:
    """What needs the model's vocabulary: logit_bias token ids in range, and the grammar compiled for this
    tokenizer (`grammars`: serve/engine/grammar.py's GrammarCompiler). Returns the grammar's matcher or None."""
    for tok in p.logit_bias or {}:
        if not 0 <= tok < vocab:
            raise RequestValidationError("params.logit_bias", f"token id {tok} is outside this model's vocabulary "
                                                              f"[0, {vocab})")
    return None if p.grammar is None else grammars.compile(p.grammar)


def rows_of(p: GenerationParams) -> int:
    """KV-cache rows a validated request occupies: its beams, or its sampled candidates."""
    return p.num_beams if p.num_beams > 1 else (p.best_of or p.n)


def validate_request(r: GenerationRequest) -> None:
    if not isinstance(r, GenerationRequest):
        raise RequestValidationError("request", f"expected a GenerationRequest, got {type(r).__name__}")
    if not isinstance(r.inputs, str):
        raise RequestValidationError("inputs", f"must be a string, got {type(r.inputs).__name__}")
    if r.adapter is not None and (not isinstance(r.adapter, str) or not r.adapter):
        raise RequestValidationError("adapter", "must be a non-empty adapter name or null for the base")
    m = r.merged_adapters
    if m is None:
        return
    field_name = "merged_adapters"
    if not isinstance(m, MergedAdapters):
        raise RequestValidationError(field_name, f"expected MergedAdapters, got {type(m).__name__}")
    if r.adapter is not None:
        raise RequestValidationError(field_name, "give either one adapter or merged_adapters, not both")
    if not isinstance(m.ids, (list, tuple)) or not m.ids or not all(isinstance(i, str) and i for i in m.ids):
        raise RequestValidationError(f"{field_name}.ids", "must be a non-empty list of adapter names")
    if m.weights is not None and not isinstance(m.weights, (list, tuple)):
        raise RequestValidationError(f"{field_name}.weights", "must be a list of numbers, one per id")
    if not isinstance(m.merge_strategy, str):
        raise RequestValidationError(f"{field_name}.merge_strategy", "must be a string")
