"""HTTP request/response models: TGI/LoRAX (`/`, `/generate`, `/generate_stream`), OpenAI (`/v1/...`), admin.

Policy for TGI/LoRAX parameters that this server does not implement: a parameter that only shapes the
response (`details`, `decoder_input_details`, `return_full_text=false`, `api_token`, `watermark=false`,
`truncate`) is accepted and ignored; one that would change the generated text (`ignore_eos_token`,
`adapter_parameters`, `adapter_source` other than local) is refused with 422 when set
to anything but its neutral value, so a client never silently gets different semantics. Unknown keys are
refused (422). Decoding parameters (penalties, beams, n / best_of, grammars, alternatives) are only typed
here: their ranges are the engine's one validation path (serve/engine/requests.py), against its caps.

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
    "ignore_eos_token": (False,),
    "adapter_parameters": (None,),
}


class GrammarIn(_Strict):
    """TGI/LoRAX `parameters.grammar`: a JSON schema (an object, or its JSON text) or a regex."""

    type: Literal["json", "regex"]
    value: Any = Field(..., description="json: the JSON schema; regex: the pattern")
    whitespace: bool = Field(False, description="extension: allow free whitespace between JSON tokens")

    def engine_dict(self) -> dict:
        return {"type": self.type, "value": self.value, "whitespace": self.whitespace}


class LoraxResponseFormat(_Strict):
    """LoRAX's `parameters.response_format`: {"type": "json_object", "schema": <JSON schema> | null}."""

    type: Literal["json_object", "text"]
    schema_: Any = Field(None, alias="schema")

    def engine_dict(self) -> dict | None:
        if self.type == "text":
            return None
        if self.schema_ is None:
            return {"type": "json_object"}
        return {"type": "json", "value": self.schema_}


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
    repetition_penalty: float | None = Field(None, description="HF/TGI: > 1 penalizes tokens already seen")
    frequency_penalty: float | None = Field(None, description="minus penalty x times a token was generated")
    presence_penalty: float | None = Field(None, description="extension: minus penalty once a token was generated")
    typical_p: float | None = Field(None, description="locally typical sampling mass (with do_sample)")
    best_of: int | None = Field(None, description="sample this many candidates; the best (cumulative "
                                                  "log-probability) is the answer, the rest in details")
    top_n_tokens: int | None = Field(None, description="the most likely alternatives of each token, in details")
    grammar: GrammarIn | None = Field(None, description="structured output: JSON schema or regex")
    response_format: LoraxResponseFormat | None = Field(None, description="LoRAX: json_object with a schema")
    min_new_tokens: int | None = Field(None, description="extension: no EOS before this many tokens")
    logit_bias: dict[str, float] | None = Field(None, description="extension: token id -> added to its logit")
    num_beams: int | None = Field(None, description="extension: beam search over this many rows (HF semantics)")
    length_penalty: float | None = Field(None, description="extension: beam scores / length ** length_penalty")
    early_stopping: bool | Literal["never"] | None = Field(None, description="extension: beam search stop rule")
    num_return_sequences: int | None = Field(None, description="extension: beams returned (others in details)")
    no_repeat_ngram_size: int | None = Field(None, description="extension: no n-gram of this size twice (HF)")
    return_k_alternatives: int | None = Field(None, description="LoRAX: top_n_tokens, as each token's "
                                                                   "alternative_tokens in details")
    # Accepted for wire compatibility; refused unless neutral (UNSUPPORTED_TGI).
    ignore_eos_token: bool = False
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
        if self.grammar is not None and self.response_format is not None:
            raise ValueError("give grammar or response_format, not both")
        return self

    def engine_grammar(self) -> dict | None:
        if self.grammar is not None:
            return self.grammar.engine_dict()
        return None if self.response_format is None else self.response_format.engine_dict()


class TGIRequest(_Strict):
    inputs: str = Field(..., min_length=1, description="the prompt (encoder input)")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    alternative_tokens: list[AlternativeToken] | None = None  # LoRAX's return_k_alternatives


class ResolvedAdapter(BaseModel):
    id: str
    version: int
    weight: float


class BestOfSequence(BaseModel):
    """TGI's other candidates of best_of (and, here, the other returned beams)."""

    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] = []


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
    top_tokens: list[list[Token]] = []
    best_of_sequences: list[BestOfSequence] | None = None


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
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


TGI_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


# ---- OpenAI --------------------------------------------------------------------------------------

class ResponseFormat(_Strict):
    """OpenAI `response_format`: text, json_object, or json_schema {"name", "schema", "strict"}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not isinstance((self.json_schema or {}).get("schema"), (dict, bool)):
            raise ValueError("response_format json_schema needs json_schema.schema (a JSON schema object)")
        return self

    def engine_dict(self) -> dict | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json", "value": self.json_schema["schema"]}


class OpenAIDecoding(_Strict):
    """What OpenAI's completions and chat completions share, plus extensions (HF `generate` names)."""

    model: str = Field(..., min_length=1, description="an adapter name, the base model's name, or adapters "
                                                      "joined by '+' (equal weights, linear)")
    merged_adapters: MergedAdaptersIn | None = Field(None, description="extension: several adapters on each row "
                                                                       "(LoRAX's schema); model then names the base")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="outputs per prompt (each a row of the batch)")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, description="-2..2: minus this once a token was generated")
    frequency_penalty: float = Field(0.0, description="-2..2: minus this x times a token was generated")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias added to its logit (-100..100)")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: structured output")
    user: str | None = None
    stream_options: dict | None = None
    apply_pattern: bool = Field(True, description="fill the adapter's recorded input pattern with each prompt; "
                                "false: the prompts are already patterned")
    # extensions (vLLM / HF generate names)
    top_k: int | None = Field(None, ge=0, description="extension: top-k filter when sampling")
    repetition_penalty: float | None = Field(None, description="extension: HF/TGI repetition penalty")
    min_tokens: int | None = Field(None, description="extension: no EOS before this many tokens")
    typical_p: float | None = Field(None, description="extension: locally typical sampling mass")
    no_repeat_ngram_size: int | None = Field(None, description="extension: no n-gram of this size twice (HF)")
    num_beams: int | None = Field(None, description="extension: beam search over this many rows (HF semantics); "
                                                    "n of the beams are returned")
    length_penalty: float | None = Field(None, description="extension: beam scores / length ** length_penalty")
    early_stopping: bool | Literal["never"] | None = Field(None, description="extension: beam search stop rule")

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, v: str | list[str] | None) -> str | list[str] | None:
        check_text([] if v is None else [v] if isinstance(v, str) else v, "stop")
        return v

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stops


class CompletionRequest(OpenAIDecoding):
    prompt: str | list[str] = Field(..., description="one prompt or a list of prompts")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, description="k: the chosen token's logprob and the k most likely "
                                                           "alternatives at each position")
    echo: Literal[False] = False
    best_of: int | None = Field(None, description="sample this many candidates per prompt, return the n best")
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompts_nonempty(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        check_text(prompts, "prompt")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, refusal, annotations... carry nothing we render

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIDecoding):
    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation; rendered into the "
                                        "encoder input by the adapter's chat template or the default one")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (default: server config)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (newer name)")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, description="alternatives per token (with logprobs: true)")
    tools: None = Field(None, description="not supported: tool calls need a model trained for them")
    tool_choice: Literal["none"] | None = None

    @model_validator(mode="after")
    def _texts(self) -> ChatCompletionRequest:
        check_text([m.text() for m in self.messages], "a message")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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
