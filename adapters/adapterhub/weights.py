"""What an AdapterHub adapter is once loaded: the project's own host tensors, per place it acts.

Nothing here is an AdapterHub object; everything input-independent was computed at load (the prefix MLP,
LoRA's alpha / r when ungated, the scaling of a bottleneck adapter as one per-channel vector).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ia3 import IA3Weights
from ..lora import LoraWeights
from ..spec import AdapterSpec

# Where bottleneck adapters sit in a T5 block: sublayer index -> AdapterHub location, per stack.
SUBLAYER_LOCATIONS = {"encoder": {0: "mh_adapter", 1: "output_adapter"},
                      "decoder": {0: "mh_adapter", 1: "cross_adapter", 2: "output_adapter"}}
# Prefix locations: AdapterHub's pool names -> (stack, sublayer index, attention module)
PREFIX_LOCATIONS = {"encoder_prefix": ("encoder", 0, "SelfAttention"), "self_prefix": ("decoder", 0, "SelfAttention"),
                    "cross_prefix": ("decoder", 1, "EncDecAttention")}


@dataclass(frozen=True)
class BottleneckForm:
    """How one adapter wires its bottleneck into the residual stream (the same at every sublayer).

    With h = the sublayer's output and r = its input (T5 passes no layer norm):
        x   = r                      if parallel else h + r·original_ln_before      (the adapter's input)
        res = h                      if parallel or residual_before_ln else x
        a   = up(act(down(LN_before(x)))) · scaling · gate
        out = LN_after(a + res)      if adapter_residual_before_ln (never for parallel) else LN_after(a) + res
        y   = out + r·original_ln_after
    """

    activation: str
    parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    adapter_residual_before_ln: bool

    def coefficients(self) -> tuple[float, float, float, float, bool, float]:
        """(x from h, x from r, res from h, res from r, adapter_residual_before_ln, y from r)."""
        if self.parallel:
            return 0.0, 1.0, 1.0, 0.0, False, float(self.original_ln_after)
        olb = float(self.original_ln_before)
        res_r = 0.0 if self.residual_before_ln else olb
        return 1.0, olb, 1.0, res_r, self.adapter_residual_before_ln, float(self.original_ln_after)


@dataclass
class BottleneckWeights:
    """One sublayer's adapter: down [k, d] + bias [k], up [d, k] + bias [d], scale [d]; optional layer
    norms (weight, bias) [d] and gate (weight [d], bias [1])."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor
    scale: torch.Tensor
    ln_before: tuple[torch.Tensor, torch.Tensor] | None = None
    ln_after: tuple[torch.Tensor, torch.Tensor] | None = None
    gate: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return self.down.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        out = [self.down, self.down_bias, self.up, self.up_bias, self.scale]
        for pair in (self.ln_before, self.ln_after, self.gate):
            if pair is not None:
                out += pair
        return out


@dataclass
class PrefixPlace:
    """One location's prefixes: keys/values [layers, tokens, heads, d_kv] (the MLP already applied) and
    optional gates: weight [layers, 2, d_model], bias [layers, 2] (key gate, value gate; equal when shared)."""

    keys: torch.Tensor
    values: torch.Tensor
    gate_weight: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[1]


@dataclass
class AdapterHubWeights:
    spec: AdapterSpec
    lora: LoraWeights | None = None  # LoRA part (alpha / r folded into B unless gated)
    ia3: IA3Weights | None = None  # (IA)3 part: output-side vectors (alpha folded in unless gated)
    linear_gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # path -> (w [in], b [1])
    form: BottleneckForm | None = None
    bottlenecks: dict[str, BottleneckWeights] = field(default_factory=dict)  # "encoder.block.0.layer.1" -> weights
    prefixes: dict[str, PrefixPlace] = field(default_factory=dict)  # "encoder_prefix" | "self_prefix" | "cross_prefix"

    @property
    def nbytes(self) -> int:
        tensors = [t for b in self.bottlenecks.values() for t in b.tensors()]
        tensors += [t for p in self.prefixes.values() for t in (p.keys, p.values, p.gate_weight, p.gate_bias)
                    if t is not None]
        tensors += [t for pair in self.linear_gates.values() for t in pair]
        extra = sum(t.numel() * t.element_size() for t in tensors)
        return extra + (self.lora.nbytes if self.lora else 0) + (self.ia3.nbytes if self.ia3 else 0)
