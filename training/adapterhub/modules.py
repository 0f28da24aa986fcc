"""AdapterHub's bottleneck adapters, LoRA, prefix tuning and their gates as the project's own torch modules,
attached to a transformers-5 `T5ForConditionalGeneration` in place (the base stays frozen).

The math is AdapterHub 1.3.0's on T5 (methods/modeling.py, lora.py, prefix_tuning.py, models/t5/), with one
deliberate difference, the gates. AdapterHub's full forward averages every gate over the whole sequence
(decoder tokens not yet generated included), while its cached `generate` computes a decoder step's gate from
that step's token alone. We train what a KV cache can serve:

- decoder: every gate is per position — position t's gate comes from token t's input; for the decoder's
  self- and cross-attention prefixes, the prefix keys/values that query t sees are scaled by gate(t);
- encoder: every gate is the mean over the row's real tokens (padding masked out, which AdapterHub does not);
- LoRA on the cross-attention k/v (their input is the encoder output): the masked mean over the source.

Module names are AdapterHub's, so `named_parameters()` of the trainable tensors are the keys of its
adapter.safetensors: `…layer.1.adapters.{name}.adapter_down.0.weight`, `…SelfAttention.q.loras.{name}.lora_A`,
`…SelfAttention.prefix_tuning.prefix_gates.{name}.weight`, and the prefix pool
`…prefix_tuning.pool.prefix_tunings.{name}.{location}.{wte.weight|control_trans.0.weight|…}` — one pool module
shared by every attention layer, so its tensors appear once, under the first layer's name.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5LayerCrossAttention, T5LayerFF, T5LayerSelfAttention

from training.adapterhub.config import kind, parts
from training.errors import TrainConfigError

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# bottleneck location -> sublayer index in a T5 block, per stack (T5's sublayers: self-attn, [cross-attn,] FFN)
SUBLAYERS = {"encoder": {"mh_adapter": 0, "output_adapter": 1},
             "decoder": {"mh_adapter": 0, "cross_adapter": 1, "output_adapter": 2}}
# prefix location -> (stack, sublayer index, attention attribute)
PREFIX_PLACES = {"encoder_prefix": ("encoder", 0, "SelfAttention"), "self_prefix": ("decoder", 0, "SelfAttention"),
                 "cross_prefix": ("decoder", 1, "EncDecAttention")}
# the config values these modules implement; AdapterHub's other options (PHM, layer norms, ...) are refused
BOTTLENECK_SUPPORTED = {"ln_before": False, "ln_after": False, "adapter_residual_before_ln": False,
                        "residual_before_ln": True, "original_ln_after": True, "phm_layer": False,
                        "inv_adapter": None, "stochastic_depth": 0.0, "dropout": 0.0}


class SourceMask:
    """The source rows' padding mask (B, S): the encoder's `attention_mask`, which the decoder receives as
    `encoder_attention_mask`. Captured by pre-hooks on both stacks, so generate() and reused encoder outputs see it."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    @classmethod
    def install(cls, model) -> SourceMask:
        source = cls()
        model.encoder.register_forward_pre_hook(lambda m, a, kw: source.set(kw.get("attention_mask")), with_kwargs=True)
        model.decoder.register_forward_pre_hook(lambda m, a, kw: source.set(kw.get("encoder_attention_mask")),
                                                with_kwargs=True)
        return source

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """(B, S, G) -> (B, 1, G): the mean over each row's real tokens."""
        if self.mask is None:
            return values.mean(dim=1, keepdim=True)
        weights = self.mask.to(values.dtype)[..., None]
        return (values * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1)


class Gated(nn.Module):
    """Base of every gated module: where its gate averages (see the module docstring)."""

    def __init__(self, per_position: bool, source: SourceMask):
        super().__init__()
        self.per_position = per_position
        self.source = source

    def gate_values(self, gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(gate(x)): (B, T, G) per position, or (B, 1, G) averaged over the source's real tokens."""
        values = torch.sigmoid(gate(x))
        return values if self.per_position else self.source.mean(values)


def _bert_init(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)


class Bottleneck(Gated):
    """AdapterHub's `Adapter` / `ParallelAdapter` after a T5 sublayer (called with layer_norm=None). With h the
    sublayer's output after dropout and x its input (the residual stream):

        a = x (parallel) | h + x (original_ln_before) | h;   y = (up(act(down(a))) · scaling · gate(a) + h) + x
    """

    def __init__(self, d_model: int, config: dict, per_position: bool, source: SourceMask):
        super().__init__(per_position, source)
        unsupported = {k: config[k] for k, v in BOTTLENECK_SUPPORTED.items() if config[k] != v}
        if unsupported or not isinstance(config["scaling"], (int, float)):
            raise TrainConfigError(f"bottleneck options {unsupported or {'scaling': config['scaling']}} are not "
                                   "implemented here")
        size = max(1, int(d_model // config["reduction_factor"]))
        self.adapter_down = nn.Sequential(nn.Linear(d_model, size), ACTIVATIONS[config["non_linearity"].lower()]())
        self.adapter_up = nn.Linear(size, d_model)
        self.gate = nn.Linear(d_model, 1) if config["use_gating"] else None
        self.parallel, self.scaling = config["is_parallel"], float(config["scaling"])
        self.original_ln_before = config["original_ln_before"]
        if config["init_weights"] == "mam_adapter":  # He et al.: the adapter starts as the identity
            nn.init.zeros_(self.adapter_down[0].bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        else:
            _bert_init(self.adapter_down[0])
            _bert_init(self.adapter_up)
        if self.gate is not None:
            _bert_init(self.gate)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = x if self.parallel else (h + x if self.original_ln_before else h)
        delta = self.adapter_up(self.adapter_down(a)) * self.scaling
        if self.gate is not None:
            delta = delta * self.gate_values(self.gate, a)
        return (delta + h) + x


class LoRA(Gated):
    """AdapterHub's `LoRA`: delta(x) = dropout(x) Aᵀ Bᵀ · (gate(x) if gated else alpha / r), added to the
    wrapped linear's output by a forward hook."""

    def __init__(self, in_features: int, out_features: int, config: dict, per_position: bool, source: SourceMask):
        super().__init__(per_position, source)
        if config["composition_mode"] != "add" or config["use_dora"] or config["vera_d"] is not None:
            raise TrainConfigError("only additive LoRA (no DoRA, VeRA or (IA)3) is implemented here")
        r = config["r"]
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = config["alpha"] / r
        self.dropout = nn.Dropout(config["dropout"])
        self.gate = nn.Linear(in_features, 1) if config["use_gating"] else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return delta * (self.gate_values(self.gate, x) if self.gate is not None else self.scaling)


class PrefixTuning(nn.Module):
    """AdapterHub's `PrefixTuning` for one location: wte (P, d_model) -> Linear(d_model, bottleneck) -> tanh ->
    Linear(bottleneck, n_layers·2·heads·d_kv); layer i's keys are slot 2i, its values slot 2i+1."""

    def __init__(self, n_layers: int, heads: int, d_model: int, d_kv: int, config: dict):
        super().__init__()
        if config["flat"] or config["dropout"]:
            raise TrainConfigError("flat or dropout prefix tuning is not implemented here")
        self.heads, self.d_kv = heads, d_kv
        self.wte = nn.Embedding(config["prefix_length"], d_model)
        self.control_trans = nn.Sequential(nn.Linear(d_model, config["bottleneck_size"]),
                                           ACTIVATIONS[config["non_linearity"].lower()](),
                                           nn.Linear(config["bottleneck_size"], n_layers * 2 * heads * d_kv))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's prefix keys and values, each (1, heads, P, d_kv)."""
        out = self.control_trans(self.wte.weight)  # the whole table: the MLP is cheap next to the model
        kv = out.view(out.shape[0], -1, self.heads, self.d_kv)[:, 2 * i:2 * i + 2].permute(1, 2, 0, 3)
        return kv[0][None], kv[1][None]


class PrefixPool(nn.Module):
    """AdapterHub's `PrefixTuningPool`: one per model, registered under every prefixed attention."""

    def __init__(self):
        super().__init__()
        self.prefix_tunings = nn.ModuleDict()


class PrefixLayer(Gated):
    """AdapterHub's `PrefixTuningLayer` in one attention: which pool entry and layer it reads, and its gate
    (Linear(d_model, 1 or 2) on the attention's normed query-side input; keys scaled by output 0, values by -1)."""

    def __init__(self, pool: PrefixPool, name: str, location: str, layer: int, gate: nn.Linear | None,
                 per_position: bool, source: SourceMask):
        super().__init__(per_position, source)
        self.pool, self.name, self.location, self.index = pool, name, location, layer
        self.prefix_gates = nn.ModuleDict({name: gate} if gate is not None else {})

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.prefix_tunings[self.name][self.location].layer(self.index)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(key gate, value gate), each (B, 1, T or 1, 1) to scale query rows' prefix scores / outputs."""
        if self.name not in self.prefix_gates:
            return None
        g = self.gate_values(self.prefix_gates[self.name], x)
        return g[..., 0][:, None, :, None], g[..., -1][:, None, :, None]


# ---- forwards bound onto the T5 modules that carry an adapter ------------------------------------------

def _only(modules: nn.ModuleDict) -> nn.Module:
    (module,) = modules.values()  # one adapter per model
    return module


def _self_attention_layer_forward(self, hidden_states, attention_mask=None, position_bias=None, cache=None, **kwargs):
    """T5LayerSelfAttention.forward with AdapterHub's mh_adapter in place of the residual add."""
    out, position_bias, weights = self.SelfAttention(self.layer_norm(hidden_states), mask=attention_mask,
                                                     position_bias=position_bias, cache=cache, **kwargs)
    return _only(self.adapters)(self.dropout(out), hidden_states), position_bias, weights


def _cross_attention_layer_forward(self, hidden_states, key_value_states, attention_mask=None, position_bias=None,
                                   cache=None, **kwargs):
    """T5LayerCrossAttention.forward with AdapterHub's cross_adapter in place of the residual add."""
    out, position_bias, weights = self.EncDecAttention(self.layer_norm(hidden_states), mask=attention_mask,
                                                       key_value_states=key_value_states,
                                                       position_bias=position_bias, cache=cache, **kwargs)
    return _only(self.adapters)(self.dropout(out), hidden_states), position_bias, weights


def _ff_layer_forward(self, hidden_states):
    """T5LayerFF.forward with AdapterHub's output_adapter in place of the residual add."""
    return _only(self.adapters)(self.dropout(self.DenseReluDense(self.layer_norm(hidden_states))), hidden_states)


LAYER_FORWARDS = {T5LayerSelfAttention: _self_attention_layer_forward,
                  T5LayerCrossAttention: _cross_attention_layer_forward, T5LayerFF: _ff_layer_forward}


def _own_key_values(self, hidden_states, key_value_states, cache, kwargs):
    """The attention's own keys and values, (B, H, K, d_kv), through the KV cache exactly as T5Attention does."""
    is_cross = key_value_states is not None
    layer_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if is_cross and cache.is_updated.get(self.layer_idx):
            return layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
    source = key_value_states if is_cross else hidden_states
    shape = (*source.shape[:-1], -1, self.key_value_proj_dim)
    keys, values = self.k(source).view(shape).transpose(1, 2), self.v(source).view(shape).transpose(1, 2)
    if cache is not None:
        keys, values = layer_cache.update(keys, values, self.layer_idx, kwargs=kwargs)
        if is_cross and isinstance(cache, EncoderDecoderCache):
            cache.is_updated[self.layer_idx] = True
    return keys, values


def _prefixed_attention_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                                cache=None, **kwargs):
    """T5Attention.forward (eager) with AdapterHub's prefix prepended to the keys and values.

    As AdapterHub's T5: the position bias is computed for the prefixed keys — key positions 0..P-1 are the
    prefix, the row's own tokens sit at P.. (own-token distances shift by P), queries at 0.. (after the cache)
    — in layer 0 and shared by the stack's other layers; cross-attention has none. The mask gains P visible
    columns. Gates scale the prefix part of each query row's scores (keys) and output (values).
    """
    batch, length = hidden_states.shape[:2]
    past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
    query = self.q(hidden_states).view(batch, length, -1, self.key_value_proj_dim).transpose(1, 2)
    keys, values = _own_key_values(self, hidden_states, key_value_states, cache, kwargs)
    prefix_keys, prefix_values = self.prefix_tuning.key_values()
    gates = self.prefix_tuning.gates(hidden_states)
    n_prefix = prefix_keys.shape[2]
    if position_bias is None:
        key_length = n_prefix + keys.shape[2]
        if self.has_relative_attention_bias:
            position_bias = self.compute_bias(length, key_length, device=query.device, past_seen_tokens=past)
        else:
            position_bias = torch.zeros((1, self.n_heads, length, key_length), device=query.device, dtype=query.dtype)
    prefix_scores = query @ prefix_keys.transpose(-1, -2)
    if gates is not None:
        prefix_scores = prefix_scores * gates[0]
    scores = torch.cat((prefix_scores, query @ keys.transpose(-1, -2)), dim=-1) + position_bias
    if mask is not None:  # eager masks are additive floats; the prefix is visible to every query
        scores = scores + F.pad(mask, (n_prefix, 0))
    weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    weights = F.dropout(weights, p=self.dropout, training=self.training)
    prefix_out = weights[..., :n_prefix] @ prefix_values
    if gates is not None:
        prefix_out = prefix_out * gates[1]
    out = (prefix_out + weights[..., n_prefix:] @ values).transpose(1, 2).reshape(batch, length, -1)
    return self.o(out), position_bias, weights


def _lora_hook(linear, args, output):
    return output + _only(linear.loras)(args[0])


# ---- attach ------------------------------------------------------------------------------------------------

def blocks(model):
    """(AdapterHub layer index, stack, block index within the stack, T5Block): encoder first, as its
    T5 `iter_layers`, so `leave_out` index L + i is decoder block i."""
    n = len(model.encoder.block)
    yield from ((i, "encoder", i, b) for i, b in enumerate(model.encoder.block))
    yield from ((n + i, "decoder", i, b) for i, b in enumerate(model.decoder.block))


def attach(model, config: dict, name: str) -> None:
    """Add AdapterHub adapter `config` (a single config or a union, as adapter_config.json's "config") to
    `model` in place under `name`. One adapter per model; the new parameters are the only trainable ones
    if the base was frozen first."""
    source = SourceMask.install(model)
    for part in parts(config):
        {"bottleneck": _add_bottlenecks, "lora": _add_loras, "prefix_tuning": _add_prefixes}[kind(part)](
            model, part, name, source)


def _add_bottlenecks(model, part: dict, name: str, source: SourceMask) -> None:
    for index, stack, _, block in blocks(model):
        if index in part["leave_out"]:
            continue
        for location, sub in SUBLAYERS[stack].items():
            if part[location]:
                layer = block.layer[sub]
                layer.adapters = nn.ModuleDict({name: Bottleneck(model.config.d_model, part, stack == "decoder",
                                                                 source)})
                layer.forward = types.MethodType(LAYER_FORWARDS[type(layer)], layer)


def _add_loras(model, part: dict, name: str, source: SourceMask) -> None:
    for index, stack, _, block in blocks(model):
        if index in part["leave_out"]:
            continue
        decoder = stack == "decoder"
        targets = []  # (linear, per-position gate)
        if part["selfattn_lora"]:
            for sub, attr in ((0, "SelfAttention"), (1, "EncDecAttention"))[:1 + decoder]:
                attention = getattr(block.layer[sub], attr)
                for m in part["attn_matrices"]:
                    # the cross-attention's k and v read the encoder output: their gate averages over the source
                    reads_source = attr == "EncDecAttention" and m != "q"
                    targets.append((getattr(attention, m), decoder and not reads_source))
        ff = block.layer[-1].DenseReluDense
        if part["intermediate_lora"]:  # gated-gelu T5 (FLAN): AdapterHub wraps wi_1
            targets.append((ff.wi_1 if hasattr(ff, "wi_1") else ff.wi, decoder))
        if part["output_lora"]:
            targets.append((ff.wo, decoder))
        for linear, per_position in targets:
            linear.loras = nn.ModuleDict({name: LoRA(linear.in_features, linear.out_features, part, per_position,
                                                     source)})
            linear.register_forward_hook(_lora_hook)


def _add_prefixes(model, part: dict, name: str, source: SourceMask) -> None:
    if part["leave_out"]:
        raise TrainConfigError("a prefix with leave_out is not implemented here (AdapterHub's T5 would give the "
                               "left-out layers no position bias, or one computed for other key lengths)")
    c = model.config
    locations = [loc for loc in PREFIX_PLACES if part.get(loc, True)]  # self_prefix has no switch: always on
    stacks = {"encoder": model.encoder, "decoder": model.decoder}
    pool = PrefixPool()
    pool.prefix_tunings[name] = nn.ModuleDict({
        loc: PrefixTuning(len(stacks[PREFIX_PLACES[loc][0]].block), c.num_heads, c.d_model, c.d_kv, part)
        for loc in locations})
    for loc in locations:
        stack, sub, attr = PREFIX_PLACES[loc]
        for i, block in enumerate(stacks[stack].block):
            gate = None
            if part["use_gating"]:
                gate = nn.Linear(c.d_model, 1 if part["shared_gating"] else 2)
                nn.init.normal_(gate.weight, std=0.02)
            attention = getattr(block.layer[sub], attr)
            attention.prefix_tuning = PrefixLayer(pool, name, loc, i, gate, stack == "decoder", source)
            attention.forward = types.MethodType(_prefixed_attention_forward, attention)
    # the prefixed attention computes eagerly and needs the masks materialised (sdpa may pass None for causal)
    model.set_attn_implementation("eager")


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The trainable tensors under AdapterHub's names, each shared tensor once (named_parameters dedups)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
