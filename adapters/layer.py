"""AdaptedLinear: one T5 linear plus per-kind slot tensors, applying each batch row's own adapter.

Per kind, a `KindSlots` object holds the stacked slot tensors of this layer (index 0 = identity) and knows
how to write/clear a slot, gather per-row weights for a batch, apply them, and merge a slot into the weight.
The gathered per-row tensors are cached on the layer until the batch state changes (new rows or slot
contents), so decoder steps with an unchanged batch do not gather again.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SlotError
from .kinds import AdapterKind


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i in one fused call (one dispatch instead of hundreds per swap)."""
    if dst:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)


class KindSlots(nn.Module):
    """Interface of one kind's slots on one layer. Slot indices here are internal (>= 1; 0 = identity).

    Slot tensors are non-persistent buffers: `model.to(...)` moves them, `state_dict()` ignores them.
    """

    kind: AdapterKind

    def stage(self, slot: int, weights, path: str, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """Prepare writing `weights` (this layer's part of them, or nothing) into `slot`: append the
        (slot view, host tensor) copy pairs to dst/src — the caller copies all layers' pairs at once — and
        update host-side bookkeeping. Small fills (identity values) may happen right here."""
        raise NotImplementedError

    def write(self, slot: int, weights, path: str) -> None:
        dst, src = [], []
        self.stage(slot, weights, path, dst, src)
        copy_all(dst, src)

    def clear(self, slot: int) -> None: ...

    def gather(self, index_host: tuple[int, ...], index: torch.Tensor, dtype: torch.dtype):
        """Per-row weights for this batch, or None when no row has this kind on this layer."""
        return None

    def drop_cache(self) -> None:
        """Forget per-batch state kept between gathers (idle: free its memory)."""

    def pre(self, x: torch.Tensor, g) -> torch.Tensor:
        return x

    def post(self, y: torch.Tensor, x: torch.Tensor, g) -> torch.Tensor:
        """`x` is the input of the base matmul (after every kind's `pre`)."""
        return y

    def merge_into(self, slot: int, weight: torch.Tensor) -> torch.Tensor | None:
        """Fold the slot into `weight` in place; return a bias to add after the matmul (or None)."""
        return None

    def touches(self, slot: int) -> bool:
        return False


class BatchState:
    """Shared by all wrapped layers of one model: the current rows and a version that changes whenever
    the rows or any slot contents change (which invalidates every layer's gathered cache)."""

    def __init__(self) -> None:
        self.rows = None  # RowAdapters | None (None: plain base)
        self.token_mask = None  # [rows, tokens] 1 = real token, for encoder passes (gate means); None in decode
        self.version = 0
        self._index: dict[tuple[AdapterKind, torch.device], torch.Tensor] = {}

    def bump(self) -> None:
        self.version += 1
        self._index = {}  # a new dict, not clear(): a reader holding the old one is never surprised

    def index_on(self, kind: AdapterKind, device: torch.device) -> torch.Tensor:
        """Per-row slot indices of `kind` on `device`, built once per version per device."""
        key = (kind, device)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(self.rows.slot_index(kind), dtype=torch.long, device=device)
        return index


class Gathered:
    """One layer's per-row weights for the current batch: kinds with pre/post hooks (in `kinds` order),
    and the BitFit per-row bias [B, out] kept apart so the base matmul can add it."""

    __slots__ = ("pre", "post", "bias")

    def __init__(self) -> None:
        self.pre: list[tuple[KindSlots, object]] = []
        self.post: list[tuple[KindSlots, object]] = []
        self.bias: torch.Tensor | None = None


class AdaptedLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, path: str, batch: BatchState, kinds: dict[AdapterKind, KindSlots],
                 cache_gathered: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.batch = batch
        self.slots = nn.ModuleDict({k.value: v for k, v in kinds.items()})
        self.kinds = tuple(kinds.items())  # (kind, KindSlots) in a fixed order: pre/post hooks run in it
        self.cache_gathered = cache_gathered
        self._cache_key = None
        self._cache = Gathered()
        self._plain = self._is_plain(base_layer)
        self._backup: torch.Tensor | None = None  # exact copy of the weight while a slot is merged
        self._merged_bias: torch.Tensor | None = None
        for slots in kinds.values():  # kinds whose slot contents depend on the base weight (DoRA's norm)
            if hasattr(slots, "bind_layer"):
                slots.bind_layer(self.unmerged_weight)

    @staticmethod
    def _is_plain(layer: nn.Module) -> bool:
        """A bare nn.Linear (no bias, no hooks): its matmul can be fused with per-row biases."""
        return (type(layer) is nn.Linear and layer.bias is None and not layer._forward_hooks
                and not layer._forward_pre_hooks)

    def replace_base_layer(self, layer: nn.Module) -> None:
        """Put another implementation of the same linear underneath (an int8 one), keeping every slot. It must
        take and give this layer's shapes and expose `weight` (its float weight, for DoRA's norms) and `device`."""
        if (layer.in_features, layer.out_features) != (self.in_features, self.out_features):
            raise SlotError(f"{self.path}: a {layer.in_features}->{layer.out_features} layer cannot replace "
                            f"{self.in_features}->{self.out_features}")
        if self.merged:
            raise SlotError(f"{self.path}: unmerge before replacing the base layer")
        self.base_layer = layer
        self._plain = self._is_plain(layer)
        self.drop_cache()

    @property
    def device(self) -> torch.device:
        layer = self.base_layer
        return layer.weight.device if isinstance(layer, nn.Linear) else layer.device

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight as if nothing were merged (the exact saved copy while a slot is merged)."""
        return self._backup if self._backup is not None else self.weight.detach()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _gathered(self, dtype: torch.dtype) -> Gathered:
        key = (self.batch.version, dtype)
        if key == self._cache_key:
            return self._cache
        rows = self.batch.rows
        out = Gathered()
        for kind, slots in self.kinds:
            if not rows.uses(kind):  # one Python check per kind, not per row
                continue
            if kind == AdapterKind.LORA and rows.combined_lora:  # rows summing weighted LoRAs
                g = slots.gather_terms(rows.lora_terms, self.device, dtype)
            else:
                g = slots.gather(rows.slot_index(kind), self.batch.index_on(kind, self.device), dtype)
            if g is None:
                continue
            if kind == AdapterKind.BITFIT:
                out.bias = g  # [B, out]: added by the base matmul itself (addmm), or in place after it
            else:  # only hooks a kind overrides are called per forward (LoRA has no pre)
                if type(slots).pre is not KindSlots.pre:
                    out.pre.append((slots, g))
                if type(slots).post is not KindSlots.post:
                    out.post.append((slots, g))
        if self.cache_gathered:
            self._cache_key, self._cache = key, out
        else:  # no memory kept between forwards, kinds' reusable buffers included
            for _, slots in self.kinds:
                slots.drop_cache()
        return out

    def drop_cache(self) -> None:
        self._cache_key, self._cache = None, Gathered()
        for _, slots in self.kinds:
            slots.drop_cache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.batch.rows
        y_bias = self._merged_bias
        if rows is None or not rows.kinds:
            y = self.base_layer(x)
            return y if y_bias is None else y + y_bias.to(y.dtype)
        n = x.shape[0]
        if n != len(rows):
            raise SlotError(f"{self.path}: batch has {n} rows but set_rows described {len(rows)}; "
                            "call AdapterSlots.set_rows for this batch before the forward")
        g = self._gathered(x.dtype)
        h = x
        for slots, gk in g.pre:
            h = slots.pre(h, gk)
        bias = g.bias
        if bias is not None and y_bias is None and self._plain and h.numel() == n * self.in_features:
            # one token per row (decode): the per-row bias rides along in the GEMM, y = bias + h @ W.T
            y = torch.addmm(bias, h.reshape(n, -1), self.base_layer.weight.t()).view(*h.shape[:-1], -1)
        else:
            y = self.base_layer(h)
            if y_bias is not None:
                y = y + y_bias.to(y.dtype)
            if bias is not None:  # y is this layer's fresh output: add in place
                y.add_(bias.view(n, *([1] * (y.dim() - 2)), bias.shape[-1]))
        # post hooks see the input the base matmul saw: with (IA)3's input scaling on a row, its LoRA acts as
        # if merged into the base under the (IA)3 ((W + BA)(l ⊙ x)); h is x itself on every other row
        for slots, gk in g.post:
            y = slots.post(y, h, gk)
        return y

    # ---- merging: exact, by restoring a saved copy (never by dividing) ------------------------------

    @property
    def merged(self) -> bool:
        return self._backup is not None or self._merged_bias is not None

    def merge(self, kind: AdapterKind, slot: int) -> bool:
        if not isinstance(self.base_layer, nn.Linear):
            raise SlotError(f"{self.path}: its base layer ({type(self.base_layer).__name__}) has no float weight "
                            "to merge into; serve the adapter per row")
        slots = self.slots[kind.value]
        if not slots.touches(slot):
            return False
        w = self.weight.data
        if kind != AdapterKind.BITFIT:
            self._backup = w.detach().to("cpu", copy=True)
        self._merged_bias = slots.merge_into(slot, w)
        return True

    def unmerge(self) -> None:
        if self._backup is not None:
            self.weight.data.copy_(self._backup)
            self._backup = None
        self._merged_bias = None

    def extra_repr(self) -> str:
        return f"{self.path}: {self.in_features}->{self.out_features}, kinds={[k.value for k, _ in self.kinds]}"
