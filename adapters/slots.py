"""attach_slots / AdapterSlots: the device-side home of adapters on a wrapped T5.

    slots = attach_slots(model, SlotConfig(slots={AdapterKind.LORA: 32, AdapterKind.PROMPT: 8}, max_rank=16))
    slots.write(AdapterKind.LORA, 3, load_adapter(path, base))      # host -> device, into slot 3
    rows = RowAdapters.from_pairs([(AdapterKind.LORA, 3), None])    # row 0 uses it, row 1 is the plain base
    embeds, mask = slots.encoder_inputs(input_ids, attention_mask, rows)   # soft prompts placed first
    slots.set_rows(rows)                                            # before every forward
    model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import prefix as prefix_kind
from . import prompt as prompt_kind
from .adapterhub.bottleneck import SublayerSlots
from .adapterhub.linear import GatedLinearSlots
from .adapterhub.prefix import AttentionPrefixSlots, EncoderPrefix
from .base import BaseDescription, is_target_path
from .bitfit import BitFitSlots
from .errors import SlotError
from .ia3 import IA3Slots
from .kinds import LINEAR_KINDS, AdapterKind
from .layer import AdaptedLinear, BatchState, copy_all
from .lora import LoraSlots
from .rows import RowAdapters


@dataclass(frozen=True)
class SlotConfig:
    slots: dict[AdapterKind, int] = field(default_factory=dict)  # slots per kind (0 / absent: kind disabled)
    max_rank: int = 16
    max_virtual_tokens: int = 32
    max_prefix_tokens: int = 32
    max_bottleneck: int = 64  # adapterhub kind: bottleneck units per slot (down projection width)
    dtype: torch.dtype | None = None  # slot tensor dtype; None: each wrapped weight's own dtype
    # Keep each layer's gathered per-row weights until the rows change (memory for speed in decode).
    cache_gathered: bool = True

    def count(self, kind: AdapterKind) -> int:
        return int(self.slots.get(kind, self.slots.get(kind.value, 0)))


def _kind_slots(kind: AdapterKind, n: int, layer: torch.nn.Linear, config: SlotConfig):
    dtype = config.dtype or layer.weight.dtype
    dev = layer.weight.device
    if kind == AdapterKind.LORA:
        return LoraSlots(n, layer.in_features, layer.out_features, config.max_rank, dtype, dev)
    if kind == AdapterKind.IA3:
        return IA3Slots(n, layer.in_features, layer.out_features, dtype, dev)
    return BitFitSlots(n, layer.out_features, dtype, dev)


# Linears AdapterHub's T5 LoRA/(IA)3 can wrap: q/k/v of every attention, wi (wi_1 when gated), wo.
ADAPTERHUB_LINEARS = ("q", "k", "v", "wi", "wi_1", "wo")


def _sublayers(model):
    """(path, module) of every T5 sublayer a bottleneck adapter may follow (attention, cross, FFN)."""
    for stack in ("encoder", "decoder"):
        for b, block in enumerate(getattr(model, stack).block):
            for j, layer in enumerate(block.layer):
                yield f"{stack}.block.{b}.layer.{j}", layer


def encoder_embedding(model) -> torch.nn.Embedding:
    """The token embedding the model's own encoder uses: the one embedding path for encoder inputs.

    Not `model.get_input_embeddings()` (`shared`): a checkpoint saved with `tie_word_embeddings=False` by
    transformers 5 holds a separate `encoder.embed_tokens.weight`, and transformers' encoder embeds with it."""
    return model.get_encoder().embed_tokens


def attach_slots(model, config: SlotConfig) -> AdapterSlots:
    """Wrap every T5 target linear (once) with slot tensors allocated up front on its weight's device."""
    if getattr(model, "_peftserve_slots", None) is not None:
        raise SlotError("this model already has adapter slots attached; reuse model._peftserve_slots")
    for kind in config.slots:
        AdapterKind(kind)  # typos fail here, not at first write
    batch = BatchState()
    layers: dict[str, AdaptedLinear] = {}
    targets = [(p, m) for p, m in model.named_modules() if is_target_path(p) and isinstance(m, torch.nn.Linear)]
    n_hub = config.count(AdapterKind.ADAPTERHUB)
    for path, linear in targets:
        kinds = {k: _kind_slots(k, config.count(k), linear, config) for k in LINEAR_KINDS if config.count(k) > 0}
        if n_hub and path.rsplit(".", 1)[-1] in ADAPTERHUB_LINEARS:
            kinds[AdapterKind.ADAPTERHUB] = GatedLinearSlots(
                n_hub, linear.in_features, linear.out_features, config.max_rank, config.dtype or linear.weight.dtype,
                linear.weight.device, batch)
        wrapped = AdaptedLinear(linear, path, batch, kinds, config.cache_gathered)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, wrapped)
        layers[path] = wrapped
    if n_hub:  # the residual hook the engine's decode functions call after each sublayer (`sublayer_residual`)
        for path, sublayer in _sublayers(model):
            norm = sublayer.layer_norm.weight
            sublayer.peftserve_bottleneck = SublayerSlots(n_hub, model.config.d_model, config.max_bottleneck,
                                                          config.dtype or norm.dtype, norm.device, batch, path)
    slots = AdapterSlots(model, config, layers, batch)
    model._peftserve_slots = slots
    return slots


def _gathered(per_layer: list[torch.Tensor], index_host) -> list[torch.Tensor]:
    """Per layer, the rows' slots ([slots+1, ...] -> [rows, ...]) on that layer's device."""
    out = []
    for t in per_layer:
        out.append(t.index_select(0, torch.tensor(index_host, dtype=torch.long, device=t.device)))
    return out


def _stacked(stores, width: int) -> list[torch.Tensor]:
    """Per layer, [rows, heads, width, d_kv] prefix keys (or values) from slot tensors [slots+1, tokens, heads,
    d_kv]: each store gathers its rows (slot 0, zeros, for rows of another store), and the stores add."""
    layers = len(stores[0][0])
    out = []
    for i in range(layers):
        total = None
        for tensors, index_host in stores:
            t = tensors[i][:, :width]
            g = t.index_select(0, torch.tensor(index_host, dtype=torch.long, device=t.device))
            total = g if total is None else total + g
        out.append(total.transpose(1, 2))
    return out


class AdapterSlots:
    """Handle on a wrapped model: write/clear slots, set per-row adapters, build encoder inputs, merge."""

    def __init__(self, model, config: SlotConfig, layers: dict[str, AdaptedLinear], batch: BatchState) -> None:
        self.model = model
        self.config = config
        self.layers = layers
        self.batch = batch
        self.merged: tuple[AdapterKind, int] | None = None
        self._merged_layers: list[AdaptedLinear] = []
        self._touched: dict[tuple[AdapterKind, int], list[AdaptedLinear]] = {}  # layers each written slot changes
        # (path, that layer's slots of a kind) per kind, listed once: a swap visits ~150 layers
        self._kind_slots = {kind: [(path, layer.slots[kind.value]) for path, layer in layers.items()]
                            for kind in LINEAR_KINDS if config.count(kind) > 0}
        emb = encoder_embedding(model)
        n_prompt = config.count(AdapterKind.PROMPT)
        self.prompts = (prompt_kind.PromptSlots(n_prompt, config.max_virtual_tokens, emb.embedding_dim,
                                                config.dtype or emb.weight.dtype, emb.weight.device)
                        if n_prompt else None)
        n_prefix = config.count(AdapterKind.PREFIX)
        self.prefixes = None
        if n_prefix:
            c = model.config
            blocks = model.get_decoder().block
            devices = [next(b.parameters()).device for b in blocks]
            self.prefixes = prefix_kind.PrefixSlots(n_prefix, config.max_prefix_tokens, c.num_heads, c.d_kv,
                                                    config.dtype or emb.weight.dtype, devices)
        n_hub = config.count(AdapterKind.ADAPTERHUB)
        self.hub_prefixes = None
        self.sublayers: dict[str, SublayerSlots] = {}
        if n_hub:
            c = model.config
            enc_devices = [next(b.parameters()).device for b in model.get_encoder().block]
            dec_devices = [next(b.parameters()).device for b in model.get_decoder().block]
            self.hub_prefixes = AttentionPrefixSlots(n_hub, config.max_prefix_tokens, c.num_heads, c.d_kv, c.d_model,
                                                     config.dtype or emb.weight.dtype, enc_devices, dec_devices)
            self.sublayers = {path: layer.peftserve_bottleneck for path, layer in _sublayers(model)}
        self._hub_linear = [(path, layer.slots[AdapterKind.ADAPTERHUB.value]) for path, layer in layers.items()
                            if AdapterKind.ADAPTERHUB.value in layer.slots]

    @property
    def embedding(self) -> torch.nn.Embedding:
        return encoder_embedding(self.model)

    def describe(self, name: str, fingerprint: str) -> BaseDescription:
        return BaseDescription.from_model(self.model, name, fingerprint)

    def _check(self, kind, slot: int) -> AdapterKind:
        kind = AdapterKind(kind)
        n = self.config.count(kind)
        if not 0 <= slot < n:
            raise SlotError(f"{kind} slot {slot} out of range: this model has {n} {kind} slots "
                            "(SlotConfig.slots)")
        if self.merged == (kind, slot):
            raise SlotError(f"{kind} slot {slot} is merged into the base weights; unmerge() first")
        return kind

    def write(self, kind, slot: int, weights) -> None:
        """Copy a loaded adapter (host tensors) into `slot` of every wrapped layer (zeros where it has none)."""
        kind = self._check(kind, slot)
        if weights.spec.kind != kind:
            raise SlotError(f"adapter {weights.spec.name!r} is a {weights.spec.kind} adapter, not {kind}")
        if kind == AdapterKind.PROMPT:
            self.prompts.write(slot + 1, weights)
        elif kind == AdapterKind.PREFIX:
            self.prefixes.write(slot + 1, weights)
        elif kind == AdapterKind.ADAPTERHUB:
            self._write_adapterhub(slot + 1, weights)
        else:
            unknown = [m for m in weights.spec.modules if m not in self.layers]
            if unknown:
                raise SlotError(f"adapter {weights.spec.name!r} targets {unknown[0]}, which this model does not have; "
                                "it was validated against a different base")
            if kind == AdapterKind.LORA and (weights.spec.rank or 0) > self.config.max_rank:
                raise SlotError(f"adapter {weights.spec.name!r} has rank {weights.spec.rank} > slot max_rank "
                                f"{self.config.max_rank}")
            dst, src = [], []
            with torch.no_grad():
                for path, kind_slots in self._kind_slots[kind]:
                    kind_slots.stage(slot + 1, weights, path, dst, src)
            copy_all(dst, src)
            self._touched[(kind, slot)] = [self.layers[m] for m in weights.spec.modules]
        self.batch.bump()

    def _write_adapterhub(self, slot: int, weights) -> None:
        """Every part of an AdapterHub adapter into `slot` of its places: linears, sublayers, attentions."""
        unknown = [m for m in weights.spec.modules if m not in self.layers] + \
            [p for p in weights.bottlenecks if p not in self.sublayers]
        if unknown:
            raise SlotError(f"adapter {weights.spec.name!r} acts on {unknown[0]}, which this model does not have; "
                            "it was validated against a different base")
        if (weights.spec.rank or 0) > self.config.max_rank:
            raise SlotError(f"adapter {weights.spec.name!r} has rank {weights.spec.rank} > slot max_rank "
                            f"{self.config.max_rank}")
        dst, src = [], []
        with torch.no_grad():
            for path, kind_slots in self._hub_linear:
                kind_slots.stage(slot, weights, path, dst, src)
        copy_all(dst, src)
        for path, sub in self.sublayers.items():
            sub.write(slot, weights.form, weights.bottlenecks.get(path))
        self.hub_prefixes.write(slot, weights)

    def clear(self, kind, slot: int) -> None:
        kind = self._check(kind, slot)
        if kind == AdapterKind.PROMPT:
            self.prompts.clear(slot + 1)
        elif kind == AdapterKind.PREFIX:
            self.prefixes.clear(slot + 1)
        elif kind == AdapterKind.ADAPTERHUB:
            for _, kind_slots in self._hub_linear:
                kind_slots.clear(slot + 1)
            for sub in self.sublayers.values():
                sub.clear(slot + 1)
            self.hub_prefixes.clear(slot + 1)
        else:
            for _, kind_slots in self._kind_slots[kind]:
                kind_slots.clear(slot + 1)
            self._touched.pop((kind, slot), None)
        self.batch.bump()

    def set_rows(self, rows: RowAdapters | None, token_mask: torch.Tensor | None = None) -> None:
        """Per-row adapters for the next forward(s); None = every row is the plain base. `token_mask`
        [rows, tokens] (1 = real token) is the encoder batch's mask: gates average over real tokens only.
        Decoder steps pass none (one token per row)."""
        self.batch.token_mask = token_mask
        if rows is not None:
            for _, t in rows.terms():
                self._check(t.kind, t.slot)  # range, and not a merged slot (its rows run as base rows)
        if rows == self.batch.rows:
            return  # same mapping: every layer keeps its gathered per-row weights
        self.batch.rows = rows
        self.batch.bump()
        if rows is None:  # idle: free the gathered per-row tensors
            for layer in self.layers.values():
                layer.drop_cache()
            for sub in self.sublayers.values():
                sub.drop_cache()

    def encoder_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: RowAdapters):
        """inputs_embeds with each prompt row's soft prompt first, and the matching attention mask."""
        if len(rows) != input_ids.shape[0]:
            raise SlotError(f"encoder_inputs: {input_ids.shape[0]} input rows but {len(rows)} RowAdapters")
        embeds = encoder_embedding(self.model)(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not rows.uses(AdapterKind.PROMPT):
            return embeds, attention_mask
        for _, t in rows.terms():
            if t.kind == AdapterKind.PROMPT:
                self._check(t.kind, t.slot)
        return self.prompts.place(embeds, attention_mask, rows.slot_index(AdapterKind.PROMPT))

    def decoder_prefixes(self, rows: RowAdapters) -> prefix_kind.DecoderPrefixes | None:
        """The joining rows' decoder-side prefixes (peft prefix tuning; AdapterHub's self and cross prefixes),
        stacked for the KV cache to copy once; None when no row has one."""
        peft = self.prefixes if self.prefixes is not None and rows.uses(AdapterKind.PREFIX) else None
        hub = self.hub_prefixes if self.hub_prefixes is not None and rows.uses(AdapterKind.ADAPTERHUB) else None
        if peft is None and hub is None:
            return None
        for _, t in rows.terms():
            self._check(t.kind, t.slot)
        pi, hi = rows.slot_index(AdapterKind.PREFIX), rows.slot_index(AdapterKind.ADAPTERHUB)
        own = hub.places["self_prefix"] if hub else None
        cross = hub.places["cross_prefix"] if hub else None
        lengths, layers, shifted = [], [], []
        for p, h in zip(pi, hi, strict=True):
            if peft is not None and p:
                lengths.append(peft.length[p])
                layers.append(peft.layers[p])
                shifted.append(False)
            else:
                m = own.length[h] if own is not None else 0
                lengths.append(m)
                layers.append(len(own.k) if m else 0)
                shifted.append(m > 0)
        out = prefix_kind.DecoderPrefixes(lengths, layers, shifted)
        width = max(lengths)
        if width:
            stores = [(peft.k, peft.v, pi)] if peft is not None else []
            stores += [(own.k, own.v, hi)] if own is not None else []
            out.keys = _stacked([(k, idx) for k, _, idx in stores], width)
            out.values = _stacked([(v, idx) for _, v, idx in stores], width)
        if own is not None:
            out.gated = [own.gated[h] for h in hi]
            if any(out.gated):
                out.gate_weight, out.gate_bias = _gathered(own.gate_w, hi), _gathered(own.gate_b, hi)
            out.cross_lengths = [cross.length[h] for h in hi]
            cross_width = max(out.cross_lengths)
            if cross_width:
                out.cross_keys = _stacked([(cross.k, hi)], cross_width)
                out.cross_values = _stacked([(cross.v, hi)], cross_width)
            out.cross_gated = [cross.gated[h] for h in hi]
            if any(out.cross_gated):
                out.cross_gate_weight, out.cross_gate_bias = _gathered(cross.gate_w, hi), _gathered(cross.gate_b, hi)
        return out

    def encoder_prefix(self, rows: RowAdapters) -> EncoderPrefix | None:
        """The encoder batch's AdapterHub prefixes (keys/values per layer, gates), or None when no row has one."""
        if self.hub_prefixes is None or not rows.uses(AdapterKind.ADAPTERHUB):
            return None
        return self.hub_prefixes.encoder_batch(rows.slot_index(AdapterKind.ADAPTERHUB))

    # ---- merging (a replica dedicated to one adapter; or (IA)3 when every row shares it) -------------

    def merge(self, kind, slot: int) -> None:
        """Fold a slot into the base weights; rows then run it as base rows (None). Exact unmerge()."""
        kind = self._check(kind, slot)
        if self.merged is not None:
            raise SlotError(f"{self.merged[0]} slot {self.merged[1]} is already merged; unmerge() first")
        if kind in (AdapterKind.PROMPT, AdapterKind.PREFIX, AdapterKind.ADAPTERHUB):
            raise SlotError(f"{kind} adapters change inputs, attention keys or sublayer outputs, not only weights; "
                            "they cannot be merged")
        with torch.no_grad():
            self._merged_layers = [layer for layer in self._touched.get((kind, slot), ()) if layer.merge(kind, slot + 1)]
        self.merged = (kind, slot)
        self.batch.bump()

    def unmerge(self) -> None:
        """Restore the exact original weights (bit-identical: saved copies are copied back)."""
        with torch.no_grad():
            for layer in self._merged_layers:  # only the touched tensors are restored
                layer.unmerge()
        self._merged_layers = []
        self.merged = None
        self.batch.bump()
