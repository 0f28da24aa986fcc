"""HTTP request/response models: TGI/LoRAX (`/`, `/generate`, `/generate_stream`), OpenAI (`/v1/...`), admin.

Policy for TGI/LoRAX parameters that this server does not implement: a parameter that only shapes the
response (`details`, `decoder_input_details`, `return_full_text=false`, `api_token`, `watermark=false`,
`truncate`) is accepted and ignored; one that would change the generated text (`repetition_penalty`,
`frequency_penalty`, `typical_p`, `best_of>1`, `grammar`, `response_format`, `ignore_eos_token`,
`adapter_source` other than local, ...) is refused with 422 when set to anything but its neutral value, so a
client never silently gets different semantics. Unknown keys are refused (422).

`merged_adapters` (LoRAX's schema) puts several adapters on one row; OpenAI requests name a combination as
`model: "a+b"` or with the same `merged_adapters` object as an extension field (docs/SERVING.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_text(values: list[str], what: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them here (422)."""
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} holds a lone surrogate (U+{ord(v[e.start]):04X} at index {e.start}); "
                             "send valid Unicode text") from None


# ---- TGI / LoRAX ---------------------------------------------------------------------------------

# name -> neutral value(s); any other value is refused (see module docstring)
UNSUPPORTED_TGI: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "frequency_penalty": (None, 0.0),
    "typical_p": (None, 1.0),
    "best_of": (None, 1),
    "grammar": (None,),
    "response_format": (None,),
    "ignore_eos_token": (False,),
    "top_n_tokens": (None, 0),
    "return_k_alternatives": (None, 0),
    "adapter_parameters": (None,),
}


class MergedAdaptersIn(_Strict):
    """Several adapters on one row: LoRAX's `merged_adapters` (what `lorax-client` sends, unchanged)."""

    ids: list[str] = Field(..., min_length=1, max_length=16, description="registered adapter names (the engine "
                                                                        "allows max_combined_adapters of them)")
    weights: list[float] | None = Field(None, description="one per id (LoRA deltas only); default 1 each")
    merge_strategy: str | None = Field(None, description="linear (default: every adapter acts on the row), "
                                                         "ties, dare_linear or dare_ties (a merged LoRA)")
    density: float = Field(1.0, description="ties / dare: the fraction of each LoRA matrix kept")
    majority_sign_method: str | None = Field(None, description="ties / dare_ties: total (default) or frequency")

    def engine_dict(self) -> dict:
        return {"ids": list(self.ids), "weights": None if self.weights is None else list(self.weights),
                "merge_strategy": self.merge_strategy or "linear", "density": self.density,
                "majority_sign_method": self.majority_sign_method or "total"}


class TGIParameters(_Strict):
    adapter_id: str | None = Field(None, description="registered adapter name; null or absent = the base model")
    merged_adapters: MergedAdaptersIn | None = Field(None, description="several adapters on this row, instead "
                                                                       "of adapter_id")
    adapter_source: str | None = Field(None, description="only 'local' (the registry); register adapters first")
    apply_pattern: bool = Field(True, description="fill the adapter's recorded input pattern (pattern-based "
                                "fine-tuning) with `inputs`; false: `inputs` is already patterned")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate (default: server config)")
    do_sample: bool = False
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1)
    watermark: bool = False
    api_token: str | None = None
    # Accepted for wire compatibility; refused unless neutral (UNSUPPORTED_TGI).
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    best_of: int | None = None
    grammar: Any = None
    response_format: Any = None
    ignore_eos_token: bool = False
    top_n_tokens: int | None = None
    return_k_alternatives: int | None = None
    adapter_parameters: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        check_text(v, "a stop sequence")
        return v

    @field_validator("adapter_source")
    @classmethod
    def _local_only(cls, v: str | None) -> str | None:
        if v not in (None, "local"):
            raise ValueError(f"adapter_source {v!r} is not supported: register the adapter (POST /adapters) and "
                             "pass its name as adapter_id")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> TGIParameters:
        for name, neutral in UNSUPPORTED_TGI.items():
            if getattr(self, name) not in neutral:
                raise ValueError(f"parameter {name!r} is not supported by this server (it would change the "
                                 f"output); omit it or set it to {neutral[-1]!r}")
        return self


class TGIRequest(_Strict):
    inputs: str = Field(..., min_length=1, description="the prompt (encoder input)")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class ResolvedAdapter(BaseModel):
    id: str
    version: int
    weight: float


class TGIDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    # a combination: what it resolved to (each id at the version served) and its strategy
    merged_adapters: list[ResolvedAdapter] | None = None
    merge_strategy: str | None = None
    prefill: list[InputToken] = []
    tokens: list[Token] = []


class TGIResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    merged_adapters: list[ResolvedAdapter] | None = None
    merge_strategy: str | None = None


class TGIStreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


TGI_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


# ---- OpenAI --------------------------------------------------------------------------------------

class CompletionRequest(_Strict):
    model: str = Field(..., min_length=1, description="an adapter name, the base model's name, or adapters "
                                                      "joined by '+' (equal weights, linear)")
    merged_adapters: MergedAdaptersIn | None = Field(None, description="extension: several adapters on each row "
                                                                       "(LoRAX's schema); model then names the base")
    prompt: str | list[str] = Field(..., description="one prompt or a list of prompts")
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=1, description="0 or 1: logprob of each chosen token")
    echo: Literal[False] = False
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    best_of: int | None = Field(None, ge=1, le=1)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    suffix: None = None
    user: str | None = None
    stream_options: dict | None = None
    apply_pattern: bool = Field(True, description="fill the adapter's recorded input pattern with each prompt; "
                                "false: the prompts are already patterned")

    @field_validator("prompt")
    @classmethod
    def _prompts_nonempty(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        check_text(prompts, "prompt")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, v: str | list[str] | None) -> str | list[str] | None:
        check_text([] if v is None else [v] if isinstance(v, str) else v, "stop")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stops


OPENAI_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}


# ---- admin ---------------------------------------------------------------------------------------

class RegisterRequest(_Strict):
    name: str = Field(..., description="1-128 characters from [A-Za-z0-9._-]")
    source: str = Field(..., min_length=1, description="a directory on the server, or a Hugging Face hub id")
    replace: bool = Field(False, description="register a new version when the name exists")


class AdapterOut(BaseModel):
    name: str
    version: int
    kind: str
    digest: str
    size_bytes: int
    source: str
    created_at: float
    spec: dict


class ErrorOut(BaseModel):
    error: str
    error_type: str
    field: str | None = None
