"""Prefix tuning: per decoder layer, learned self-attention keys and values placed before each row's own.

What peft (0.21.2, transformers 5) computes for T5, and what is served: `prompt_embeddings` is
[num_virtual_tokens, num_layers * 2 * token_dim] — with `prefix_projection`, the projection MLP's output,
since `save_pretrained` stores `get_prompt_embedding_to_save` (the MLP ran once, at save time). peft views it
as 2·num_layers tensors [n, heads, token_dim / heads], duplicates the list for the two transformer
submodules and regroups it four per layer into (self K, self V, cross K, cross V); then it replaces the
cross-attention cache with an empty one. So only the decoder's self-attention sees a prefix, and decoder
layer i takes list entries 4i and 4i+1 of the duplicated list, i.e. tensors (4i) mod 2L and (4i+1) mod 2L
of the file (L = the config's num_layers, the encoder's depth). A decoder shallower than L uses the first
layers' worth; a deeper one makes peft's forward fail, so such a base refuses the adapter. The encoder and
the cross-attention are untouched.

The prefix keys sit before the decoder's tokens: T5Stack starts cache_position at the prefix length n, so a
query at decoder position p attends prefix key j at relative position j - n - p, and its own tokens at the
usual distances. peft's `generate` drops the prefix (its cache is rebuilt), so the forward is what the
adapter was trained to compute, and what is served (docs/ADAPTERS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import BaseDescription
from .common import base_model_of, check_task_type
from .errors import (
    AdapterLimitError,
    AdapterMismatchError,
    CorruptAdapterError,
    SlotError,
    UnsupportedAdapterError,
)
from .format import AdapterFiles
from .kinds import AdapterKind
from .spec import AdapterLimits, AdapterSpec

KEY = "prompt_embeddings"


@dataclass
class DecoderPrefixes:
    """The decoder-side prefixes of a batch of joining rows, stacked, as the KV cache copies them once when
    the rows join (`KVCache.set_prefixes`): per decoder layer, self-attention keys/values [rows, heads, P,
    d_kv] (P = the longest; zeros past a row's length and in layers at or past its `layers`), AdapterHub's
    cross-attention prefixes likewise, and gate weights ([rows, 2, d_model], [rows, 2]) where any row is gated.

    `shifted` is the position convention per row: peft puts the decoder's queries and own keys after the
    prefix (prefix key j at j - m - p from the query at step p); AdapterHub puts only the own keys after it
    (prefix key j at j - p, own key s at m + s - p)."""

    lengths: list[int]
    layers: list[int]
    shifted: list[bool]
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    gated: list[bool] = field(default_factory=list)
    gate_weight: list | None = None
    gate_bias: list | None = None
    cross_lengths: list[int] = field(default_factory=list)
    cross_keys: list = field(default_factory=list)
    cross_values: list = field(default_factory=list)
    cross_gated: list[bool] = field(default_factory=list)
    cross_gate_weight: list | None = None
    cross_gate_bias: list | None = None


@dataclass
class PrefixWeights:
    spec: AdapterSpec
    keys: torch.Tensor  # [decoder layers served, n, heads, d_kv]
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def _int(files: AdapterFiles, key: str) -> int:
    v = files.config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CorruptAdapterError(f"adapter {files.path}: prefix tuning needs a positive integer {key} "
                                  f"(got {v!r}); re-save the adapter with PeftModel.save_pretrained")
    return v


def layer_sources(num_layers: int, num_decoder_layers: int) -> list[tuple[int, int]]:
    """(key tensor, value tensor) index into the file's 2·num_layers tensors, per served decoder layer."""
    two_l = 2 * num_layers
    return [((4 * i) % two_l, (4 * i + 1) % two_l) for i in range(min(num_layers, num_decoder_layers))]


def inspect(files: AdapterFiles, base: BaseDescription, limits: AdapterLimits, name: str) -> AdapterSpec:
    check_task_type(files, required=True)
    n, layers = _int(files, "num_virtual_tokens"), _int(files, "num_layers")
    heads, token_dim = _int(files, "num_attention_heads"), _int(files, "token_dim")
    subs = files.config.get("num_transformer_submodules") or 2
    if subs != 2:
        raise UnsupportedAdapterError(f"adapter {files.path}: prefix tuning with num_transformer_submodules={subs!r} "
                                      "is not an encoder-decoder prefix; save it with task_type SEQ_2_SEQ_LM")
    if set(files.tensors) != {KEY}:
        extra = sorted(set(files.tensors) - {KEY}) or [f"missing {KEY}"]
        raise UnsupportedAdapterError(f"adapter {files.path}: a prefix-tuning file holds exactly '{KEY}' "
                                      f"(found {extra[0]!r}); re-save it with PeftModel.save_pretrained")
    if heads != base.num_heads or token_dim % heads or token_dim // heads != base.d_kv:
        raise AdapterMismatchError(
            f"adapter {files.path}: prefix key/values are {heads} heads x {token_dim // heads if heads else 0} but "
            f"base {base.name!r} attends with {base.num_heads} heads x d_kv {base.d_kv}: the adapter was made "
            f"for another model, or trained with peft's default token_dim (d_model) on a T5 whose heads x d_kv "
            f"differs; retrain with token_dim={base.num_heads * base.d_kv}, num_attention_heads={base.num_heads}")
    if base.num_decoder_layers > layers:
        raise AdapterMismatchError(
            f"adapter {files.path}: a prefix for num_layers={layers} layers cannot serve base {base.name!r} with "
            f"{base.num_decoder_layers} decoder layers: peft's own forward fails there (its cache has {layers} "
            "entries), so the adapter defines nothing for the deeper layers")
    if layers != base.num_layers:
        raise AdapterMismatchError(f"adapter {files.path}: num_layers={layers} but base {base.name!r} has "
                                   f"{base.num_layers}; the adapter was made for another model")
    shape = tuple(files.tensors[KEY].shape)
    if shape != (n, layers * 2 * token_dim):
        raise AdapterMismatchError(f"adapter {files.path}: {KEY} has shape {list(shape)}, expected "
                                   f"[{n}, {layers * 2 * token_dim}] ({n} tokens x {layers} layers x 2 x {token_dim})")
    if n > limits.max_prefix_tokens:
        raise AdapterLimitError(f"adapter {files.path}: a {n}-token prefix is above this server's max_prefix_tokens="
                                f"{limits.max_prefix_tokens}; retrain shorter or raise the limit")
    served = len(layer_sources(layers, base.num_decoder_layers))
    notes = ["served as peft's forward computes it (decoder self-attention prefixes; its generate drops them)"]
    return AdapterSpec(
        name=name, kind=AdapterKind.PREFIX, rank=None, targets=(), num_virtual_tokens=n,
        size_bytes=files.size_bytes, base_model=base_model_of(files), path=str(files.path), notes=tuple(notes),
        options={"prefix_projection": bool(files.config.get("prefix_projection")), "decoder_layers": served},
        method="prefix")


def build(spec: AdapterSpec, files: AdapterFiles, tensors: dict[str, torch.Tensor], base: BaseDescription | None = None) -> PrefixWeights:
    n, layers = files.config["num_virtual_tokens"], files.config["num_layers"]
    heads, token_dim = files.config["num_attention_heads"], files.config["token_dim"]
    table = tensors[KEY].view(n, 2 * layers, heads, token_dim // heads)
    pairs = layer_sources(layers, spec.options["decoder_layers"])
    keys = torch.stack([table[:, k] for k, _ in pairs]).contiguous()
    values = torch.stack([table[:, v] for _, v in pairs]).contiguous()
    return PrefixWeights(spec=spec, keys=keys, values=values)


class PrefixSlots:
    """Stacked prefixes per decoder layer, on that layer's device: keys/values [slots+1, max_tokens, heads, d_kv]
    per layer; slot 0 is empty. A joining row's prefix is copied from here into its KV-cache row once."""

    def __init__(self, n: int, max_tokens: int, heads: int, d_kv: int, dtype, devices: list[torch.device]) -> None:
        # plain tensors, one per decoder layer on its device (a split base spans devices); never saved
        self.k = [torch.zeros(n + 1, max_tokens, heads, d_kv, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.length = [0] * (n + 1)  # host-side: prefix tokens per slot
        self.layers = [0] * (n + 1)  # host-side: decoder layers [0, layers) that get the prefix
        self.max_tokens = max_tokens

    def nbytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in self.k)

    def write(self, slot: int, weights: PrefixWeights) -> None:
        layers, n = weights.keys.shape[:2]
        if n > self.max_tokens:
            raise SlotError(f"prefix adapter {weights.spec.name!r} has {n} tokens; slots hold at most "
                            f"{self.max_tokens} (SlotConfig.max_prefix_tokens)")
        if layers > len(self.k):
            raise SlotError(f"prefix adapter {weights.spec.name!r} has {layers} decoder layers; this model has "
                            f"{len(self.k)}")
        with torch.no_grad():
            for i in range(len(self.k)):
                self.k[i][slot].zero_()
                self.v[i][slot].zero_()
                if i < layers:
                    self.k[i][slot, :n].copy_(weights.keys[i])
                    self.v[i][slot, :n].copy_(weights.values[i])
        self.length[slot], self.layers[slot] = n, layers

    def clear(self, slot: int) -> None:
        for i in range(len(self.k)):
            self.k[i][slot].zero_()
            self.v[i][slot].zero_()
        self.length[slot], self.layers[slot] = 0, 0
