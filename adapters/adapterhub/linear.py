"""The adapterhub kind on one wrapped linear: LoRA ("add") or (IA)3 ("scale") in AdapterHub's layout, each
optionally gated, per row.

The math is LoRA's and (IA)3's own (their slot classes are reused: grouped or per-row batched matmuls, one
scale vector per row); a gate only multiplies, per row, by a scalar g = mean(sigmoid(x·w + b)):
    LoRA   y = W x + g · (x A B)   = W x + (g x) A B      (B holds alpha / r when ungated, g = 1 then)
    (IA)3  y = (W x) ⊙ v · g                              (v holds alpha when ungated)
"""

from __future__ import annotations

import torch

from ..ia3 import IA3Slots
from ..kinds import AdapterKind
from ..layer import KindSlots
from ..lora import LoraSlots
from .gates import gate_or_one, row_gates


def _mask(flags: list[bool], device):
    """Rows a gate applies to: None = all of them, False = none, else a [B] bool tensor."""
    if all(flags):
        return None
    return torch.tensor(flags, device=device) if any(flags) else False


class GatedLinearSlots(KindSlots):
    kind = AdapterKind.ADAPTERHUB

    def __init__(self, n: int, fan_in: int, fan_out: int, max_rank: int, dtype, device, batch) -> None:
        super().__init__()
        self.lora = LoraSlots(n, fan_in, fan_out, max_rank, dtype, device)
        self.ia3 = IA3Slots(n, fan_in, fan_out, dtype, device)
        self.register_buffer("gate_weight", torch.zeros(n + 1, 1, fan_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("gate_bias", torch.zeros(n + 1, 1, dtype=dtype, device=device), persistent=False)
        self.gated = [False] * (n + 1)
        self.batch = batch  # the model's BatchState: the encoder's token mask for gate means

    def stage(self, slot: int, weights, path: str, dst: list, src: list) -> None:
        lora, ia3 = weights.lora, weights.ia3
        if lora is not None and path in lora.slot_layout:
            self.lora.stage(slot, lora, path, dst, src)
        else:
            self.lora.clear(slot)
        if ia3 is not None and path in ia3.vectors:
            self.ia3.stage(slot, ia3, path, dst, src)
        else:
            self.ia3.clear(slot)
        gate = weights.linear_gates.get(path)
        self.gated[slot] = gate is not None
        if gate is not None:
            dst += (self.gate_weight[slot, 0], self.gate_bias[slot])
            src += gate
        else:
            self.gate_weight[slot].zero_()
            self.gate_bias[slot].zero_()

    def clear(self, slot: int) -> None:
        self.lora.clear(slot)
        self.ia3.clear(slot)
        self.gated[slot] = False

    def touches(self, slot: int) -> bool:
        return self.lora.touches(slot) or self.ia3.touches(slot)

    def gather(self, index_host, index, dtype):
        lora_g = self.lora.gather(index_host, index, dtype)
        ia3_g = self.ia3.gather(index_host, index, dtype)
        if lora_g is None and ia3_g is None:
            return None
        gate = None
        if any(self.gated[s] for s in index_host):
            dev = index.device
            lora_rows = _mask([self.gated[s] and self.lora.touches(s) for s in index_host], dev)
            ia3_rows = _mask([self.gated[s] and self.ia3.touches(s) for s in index_host], dev)
            gate = (self.gate_weight.index_select(0, index).to(dtype), self.gate_bias.index_select(0, index).to(dtype),
                    lora_rows, ia3_rows)
        return lora_g, ia3_g, gate

    def drop_cache(self) -> None:
        self.lora.drop_cache()

    def post(self, y, x, g):
        lora_g, ia3_g, gate = g
        lora_scale = ia3_scale = None
        if gate is not None:
            w, b, lora_rows, ia3_rows = gate
            shape = (-1, *([1] * (x.dim() - 1)))
            scores = row_gates(x, w, b, self.batch.token_mask)[:, 0]  # [B]
            lora_scale = None if lora_rows is False else gate_or_one(scores, lora_rows).view(shape)
            ia3_scale = None if ia3_rows is False else gate_or_one(scores, ia3_rows).view(shape)
        if lora_g is not None:
            y = self.lora.post(y, x if lora_scale is None else x * lora_scale, lora_g)
        if ia3_g is not None:
            y = self.ia3.post(y, x, ia3_g)
            if ia3_scale is not None:
                y = y.mul_(ia3_scale)
        return y
