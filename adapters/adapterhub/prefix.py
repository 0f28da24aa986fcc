"""AdapterHub prefix tuning, per row: prefixes on the encoder's self-attention, the decoder's self-attention
and the cross-attention, each optionally gated.

What AdapterHub 1.3 computes on T5, and what is served:
- each location's prefix keys/values come from its own MLP (run once at load: `load._prefix_place`);
- a prefix's P keys go before the row's own keys, and T5's position bias is computed over the longer key
  list: prefix key j sits at memory position j and the row's own token s at P + s, while the query at i
  stays at i (relative positions j - i and P + s - i). Decoder queries likewise stay at their own step t.
  Cross-attention has no position bias;
- with `use_gating`, gate = mean(sigmoid(Linear(d_model, 1 or 2)(x))) over the sequence, with x the
  attention's (layer-normed) query-side input; keys are scaled by gate[0], values by gate[-1]. Served as
  `gates.py` says: encoder gates over the row's real tokens, a decoder step's gates from its own token.

Slots keep, per location and layer, [slots+1, max_tokens, heads, d_kv] keys and values on that layer's
device. The encoder's are gathered per batch (`encoder_batch`); the decoder's (self and cross) are copied
into the joining rows' KV-cache rows once, with their gate weights (`AdapterSlots.decoder_prefixes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlotError
from .weights import AdapterHubWeights


@dataclass
class EncoderPrefix:
    """One encoder batch's prefixes: lengths per row (0 = none) and, per encoder layer, keys/values
    [B, heads, P, d_kv] (zeros past a row's length) and gates (weight [B, 2, d], bias [B, 2]) where gated."""

    lengths: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    gate_weight: list[torch.Tensor] | None
    gate_bias: list[torch.Tensor] | None
    gated: torch.Tensor | None  # [B] bool

    @property
    def width(self) -> int:
        return max(self.lengths)


class _Place:
    """One location's slots, one tensor per layer on that layer's device."""

    def __init__(self, n: int, max_tokens: int, heads: int, d_kv: int, d_model: int, dtype, devices) -> None:
        self.k = [torch.zeros(n + 1, max_tokens, heads, d_kv, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.gate_w = [torch.zeros(n + 1, 2, d_model, dtype=dtype, device=d) for d in devices]
        self.gate_b = [torch.zeros(n + 1, 2, dtype=dtype, device=d) for d in devices]
        self.length = [0] * (n + 1)
        self.gated = [False] * (n + 1)
        self.max_tokens = max_tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.k, self.v, self.gate_w, self.gate_b) for t in ts)

    def write(self, slot: int, place) -> None:
        self.clear(slot)
        if place is None:
            return
        layers, n = place.keys.shape[:2]
        if n > self.max_tokens:
            raise SlotError(f"a {n}-token prefix does not fit slots of {self.max_tokens} (SlotConfig.max_prefix_tokens)")
        if layers != len(self.k):
            raise SlotError(f"a prefix for {layers} layers does not fit a model with {len(self.k)} here")
        with torch.no_grad():
            for i in range(layers):
                self.k[i][slot, :n].copy_(place.keys[i])
                self.v[i][slot, :n].copy_(place.values[i])
                if place.gate_weight is not None:
                    self.gate_w[i][slot].copy_(place.gate_weight[i])
                    self.gate_b[i][slot].copy_(place.gate_bias[i])
        self.length[slot], self.gated[slot] = n, place.gate_weight is not None

    def clear(self, slot: int) -> None:
        if self.length[slot]:
            for ts in (self.k, self.v, self.gate_w, self.gate_b):
                for t in ts:
                    t[slot].zero_()
        self.length[slot], self.gated[slot] = 0, False


class AttentionPrefixSlots:
    def __init__(self, n: int, max_tokens: int, heads: int, d_kv: int, d_model: int, dtype,
                 encoder_devices: list[torch.device], decoder_devices: list[torch.device]) -> None:
        self.places = {"encoder_prefix": _Place(n, max_tokens, heads, d_kv, d_model, dtype, encoder_devices),
                       "self_prefix": _Place(n, max_tokens, heads, d_kv, d_model, dtype, decoder_devices),
                       "cross_prefix": _Place(n, max_tokens, heads, d_kv, d_model, dtype, decoder_devices)}

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.places.values())

    def write(self, slot: int, weights: AdapterHubWeights) -> None:
        for name, place in self.places.items():
            place.write(slot, weights.prefixes.get(name))

    def clear(self, slot: int) -> None:
        for place in self.places.values():
            place.clear(slot)

    def encoder_batch(self, index_host: tuple[int, ...]) -> EncoderPrefix | None:
        place = self.places["encoder_prefix"]
        lengths = [place.length[s] for s in index_host]
        width = max(lengths)
        if width == 0:
            return None
        keys, values, gw, gb = [], [], [], []
        gated = [place.gated[s] for s in index_host]
        for i in range(len(place.k)):
            index = torch.tensor(index_host, dtype=torch.long, device=place.k[i].device)
            keys.append(place.k[i][:, :width].index_select(0, index).transpose(1, 2))
            values.append(place.v[i][:, :width].index_select(0, index).transpose(1, 2))
            if any(gated):
                gw.append(place.gate_w[i].index_select(0, index))
                gb.append(place.gate_b[i].index_select(0, index))
        return EncoderPrefix(lengths, keys, values, gw if any(gated) else None, gb if any(gated) else None,
                             torch.tensor(gated) if any(gated) else None)
