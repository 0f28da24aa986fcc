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
    possibly forming, or for special tokens); concatenating `text` over events gives the final text."""

    token_id: int
    text: str
    logprob: float | None
    index: int


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
                            top_k=top_k, seed=p.seed, stop=stop, logprobs=p.logprobs)


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
