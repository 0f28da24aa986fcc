"""EngineConfig: one pydantic model for everything the engine needs (read from the Serve YAML by the app).

Byte sizes accept ints or strings like "512MiB", "24GB", "1.5GiB".
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.engine.errors import ConfigError

KINDS = ("lora", "ia3", "bitfit", "prompt", "prefix", "adapterhub")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """1024, "512MiB", "24GB", "1.5 GiB" -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a byte size must be a number or a string like '512MiB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a byte size must be >= 0")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a byte size; write e.g. 1048576, '512MiB' or '24GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- base and placement ----------------------------------------------------------------------
    base: str | None = Field(None, description="hub id or local T5 directory; None = the embedded tiny base")
    dtype: Literal["float32", "bfloat16", "float16", "int8"] | None = Field(
        None, description="None: bfloat16 on GPU, float32 on CPU. T5 overflows in float16 (refused unless forced). "
                          "int8 (CPU): the base's linears and LM head in int8, everything else and every adapter "
                          "float32, per row")
    force_fp16: bool = Field(False, description="allow dtype=float16 although T5 activations overflow in it")
    device: str = Field("cpu", description='"cpu", "cuda", "cuda:N", or "auto" (split over all GPUs by budget)')
    device_map: dict[str, str] | None = Field(
        None, description="explicit module -> device map (keys as in serve.device_map.plan_device_map)")
    device_memory: dict[str, int] | None = Field(
        None, description='per-device budget for the planner, e.g. {"cuda:0": "20GiB", "cuda:1": "20GiB"}')

    # --- request limits --------------------------------------------------------------------------
    max_batch_rows: int = Field(32, ge=1, le=4096, description="rows decoding at once")
    max_batch_tokens: int = Field(65536, ge=1, description="sum of input + max_new_tokens over running rows")
    max_input_tokens: int = Field(512, ge=1, description="longest accepted input (tokens, before soft prompt)")
    max_new_tokens_cap: int = Field(256, ge=1, description="largest accepted max_new_tokens; sizes the KV cache")
    default_max_new_tokens: int | None = Field(
        None, ge=1, description="max_new_tokens when a request gives none; None: min(64, max_new_tokens_cap)")
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_chars: int = Field(64, ge=1, description="longest accepted stop sequence (characters)")
    max_queue: int = Field(1024, ge=1, description="waiting requests before OverloadedError")
    # --- decoding breadth (serve/engine/requests.py validates against these) -------------------------
    max_beams: int = Field(8, ge=1, description="largest accepted num_beams (each beam is a batch row)")
    max_n: int = Field(8, ge=1, description="largest accepted n / best_of (each candidate is a batch row)")
    max_top_n_tokens: int = Field(10, ge=0, description="most alternatives per token (top_n_tokens, logprobs: k)")
    max_logit_bias: int = Field(300, ge=0, description="most tokens one request may bias (logit_bias)")
    max_grammar_bytes: int = Field(65536, ge=1, description="largest accepted grammar (JSON schema or regex)")
    request_timeout_s: float = Field(120.0, gt=0, description="deadline per request, queue wait included")

    # --- scheduling ------------------------------------------------------------------------------
    scheduling: Literal["continuous", "static"] = Field(
        "continuous", description="static = admit a new batch only when the running one is done (baseline)")
    max_prefill_tokens: int | None = Field(
        8192, ge=1, description="input tokens per encoder pass (joins beyond wait one step); None: no pacing")
    fairness_max_skips: int = Field(
        16, ge=0, description="a waiting request overtaken this many times blocks younger ones (aging)")
    ia3_merge: Literal["auto", "never", "dedicated"] = Field(
        "auto", description="auto: merge (IA)3 when every running row uses the same one; dedicated: keep "
                            "`dedicated_adapter` merged; never: always the per-row path")
    dedicated_adapter: str | None = None
    ia3_merge_after_steps: int = Field(
        4, ge=0, description="auto mode: merge once every running row used the same (IA)3 adapter this many "
                             "consecutive steps (a merge copies the targeted weights)")

    # --- adapter cache ---------------------------------------------------------------------------
    device_slots: dict[str, int] = Field(
        default_factory=lambda: {"lora": 32, "ia3": 32, "bitfit": 32, "prompt": 32, "prefix": 16, "adapterhub": 8},
        description="slot tensors allocated up front per kind (device tier count bound)")
    device_bytes: int | None = Field(None, description="bound on adapter bytes resident in device slots")
    host_bytes: int = Field(2 * 2**30, ge=0, description="bound on adapter bytes cached in host memory")
    loader_threads: int = Field(2, ge=1, le=16, description="background disk -> host loaders")
    max_rank: int = Field(16, ge=1, description="largest LoRA rank accepted (sizes the LoRA slots)")
    max_virtual_tokens: int = Field(32, ge=1, description="longest soft prompt accepted")
    max_prefix_tokens: int = Field(32, ge=1, description="longest prefix (prefix tuning) accepted; sizes the "
                                                         "KV cache's prefix region")
    max_bottleneck: int = Field(256, ge=1, description="widest bottleneck adapter accepted (units of its down "
                                                       "projection; sizes the adapterhub kind's sublayer slots)")
    max_adapter_file_bytes: int = Field(512 * 2**20, ge=1)
    max_combined_adapters: int = Field(4, ge=1, le=16, description="most adapters one request may combine "
                                                                   "(merged_adapters.ids)")
    max_derived_adapters: int = Field(16, ge=1, description="distinct ties/dare combinations kept built (LRU)")

    @field_validator("device_bytes", "host_bytes", "max_adapter_file_bytes", mode="before")
    @classmethod
    def _bytes(cls, v):
        return None if v is None else parse_bytes(v)

    @field_validator("device_memory", mode="before")
    @classmethod
    def _budgets(cls, v):
        return None if v is None else {str(k): parse_bytes(b) for k, b in dict(v).items()}

    @field_validator("device_slots")
    @classmethod
    def _slots(cls, v):
        unknown = set(v) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown adapter kinds {sorted(unknown)}; kinds are {', '.join(KINDS)}")
        if any(n < 0 for n in v.values()):
            raise ValueError("slot counts must be >= 0")
        return {k: int(v.get(k, 0)) for k in KINDS}

    @model_validator(mode="after")
    def _consistent(self):
        if (self.default_max_new_tokens or 0) > self.max_new_tokens_cap:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens_cap")
        if self.ia3_merge == "dedicated" and not self.dedicated_adapter:
            raise ValueError('ia3_merge="dedicated" needs dedicated_adapter (the adapter this replica serves)')
        if self.dtype == "int8":
            if self.uses_cuda():
                raise ValueError("dtype int8 runs on the CPU only (torch's quantized linears have no CUDA kernels); "
                                 "use bfloat16 on GPUs")
            if self.ia3_merge == "dedicated":
                raise ValueError('dtype int8 cannot merge adapters into its int8 weights: use ia3_merge "auto" or '
                                 '"never" (adapters are served per row)')
        return self

    # --- resolved values -------------------------------------------------------------------------
    def resolved_default_max_new_tokens(self) -> int:
        return self.default_max_new_tokens or min(64, self.max_new_tokens_cap)

    def uses_cuda(self) -> bool:
        if self.device_map:
            return any(d.startswith("cuda") for d in self.device_map.values())
        if self.device_memory:
            return any(d.startswith("cuda") for d in self.device_memory)
        return self.device.startswith("cuda") or self.device == "auto"

    def torch_dtype(self):
        """The dtype to load the base in; raises ConfigError for fp16 unless forced."""
        import torch

        name = self.dtype or ("bfloat16" if self.uses_cuda() else "float32")
        if name == "int8":  # the float dtype of what stays float; the linears are quantized after loading
            name = "float32"
        if name == "float16" and not self.force_fp16:
            raise ConfigError("dtype float16 is refused: T5 activations overflow in fp16 (inf/NaN outputs). "
                              "Use bfloat16 (GPU default) or float32, or set force_fp16=true to insist.")
        return getattr(torch, name)
