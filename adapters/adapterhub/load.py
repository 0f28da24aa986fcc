"""inspect (header only, at registration) and build (host tensors) for AdapterHub-format adapters.

Tensor keys are AdapterHub's own (model.save_adapter):
    {stack}.block.{i}.layer.{j}.adapters.{name}.adapter_down.{0|1}.weight ...        bottleneck adapters
    {stack}.block.{i}.layer.{j}.{SelfAttention|EncDecAttention}.{q|k|v}.loras.{name}.lora_A ...   LoRA/(IA)3
    {stack}.block.{i}.layer.{j}.DenseReluDense.{wi|wi_1|wo}.loras.{name}.lora_B ...
    {stack}.block.{i}.layer.{j}.{...Attention}.prefix_tuning.prefix_gates.{name}.weight             prefix gates
    prefix_tuning.prefix_tunings.{name}.{encoder|self|cross}_prefix.{wte.weight|control_trans...}   prefix pool
    {attention}.prefix_tuning.pool.prefix_tunings.{name}.{...}_prefix.{...}        the same pool, per layer
The prefix pool is one module (the model's `prefix_tuning`) that every attention layer also holds as `pool`, so
AdapterHub's state dict repeats each pool tensor under the model-level key and under every attention layer's
key. Its loader walks the module tree and fills the pool from whichever of these keys a file has (all, any one
layer's, or the model-level one); its safetensors writer refuses the repeats, so files hold each pool tensor
once: `safetensors.torch.save_model` keeps the alphabetically first name (decoder.block.0.layer.0.SelfAttention's),
other tools the model-level one. All forms are read; copies of one tensor must agree (AdapterHub would silently
take the last one it visits). Files saved from a flex-head model (T5AdapterModel) carry every key under
`transformer.`, which AdapterHub's loader strips when all keys have it. Prediction-head files
(head_config.json, model_head.safetensors) are ignored.

Which adapter kind serves it: an ungated AdapterHub LoRA or (IA)3 alone is plain LoRA / (IA)3 (served, and
merged, by those kinds); everything else (bottleneck adapters, prefixes, gates, unions) is the `adapterhub`
kind, whose parts act at once on one row.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from ..base import BaseDescription
from ..errors import AdapterLimitError, AdapterMismatchError, CorruptAdapterError, UnsupportedAdapterError
from ..format import AdapterFiles
from ..ia3 import IA3Weights
from ..kinds import AdapterKind
from ..lora import LoraWeights
from ..spec import AdapterLimits, AdapterSpec
from .config import AdapterHubConfig, BottleneckConfig, LinearConfig, PrefixConfig, parse_config
from .weights import (
    PREFIX_LOCATIONS,
    SUBLAYER_LOCATIONS,
    AdapterHubWeights,
    BottleneckForm,
    BottleneckWeights,
    PrefixPlace,
)

_BLOCK = r"(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.(?P<sub>\d+)"
BOTTLENECK_KEY = re.compile(_BLOCK + r"\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$")
LINEAR_KEY = re.compile(_BLOCK + r"\.(?P<module>(?:SelfAttention|EncDecAttention)\.[qkv]|DenseReluDense\.(?:wi|wi_1|wo))"
                        r"\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B|gate\.weight|gate\.bias)$")
PREFIX_GATE_KEY = re.compile(_BLOCK + r"\.(?P<attn>SelfAttention|EncDecAttention)\.prefix_tuning\.prefix_gates\."
                             r"(?P<name>[^.]+)\.(?P<param>weight|bias)$")
# the pool under one attention layer (`layer` set) or at model level
POOL_KEY = re.compile(r"(?:(?P<layer>(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention))"
                      r"\.prefix_tuning\.pool\.|prefix_tuning\.)prefix_tunings\.(?P<name>[^.]+)\."
                      r"(?P<loc>encoder_prefix|self_prefix|cross_prefix)\.(?P<param>.+)$")
MODEL_PREFIX = "transformer."  # T5AdapterModel's base_model_prefix: its files hold every key under it
POOL_PARAMS_MLP = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                   "control_trans.2.bias")


def layer_number(stack: str, block: int, base: BaseDescription) -> int:
    """AdapterHub's layer index (`leave_out`, per-layer reduction factors): encoder blocks first."""
    return block if stack == "encoder" else base.num_layers + block


class _Parsed:
    """The tensor keys sorted by place (header only)."""

    def __init__(self) -> None:
        self.bottleneck: dict[str, dict[str, str]] = defaultdict(dict)  # sublayer path -> param -> key
        self.linear: dict[str, dict[str, str]] = defaultdict(dict)  # module path -> param -> key
        self.prefix_gates: dict[str, dict[str, str]] = defaultdict(dict)  # attention path -> param -> key
        # location -> param -> every key holding that pool tensor (model-level and per-layer copies)
        self.pool: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    def pool_key(self, loc: str, param: str) -> str | None:
        """The key to read a pool tensor from (its copies are checked equal by _check_pool_copies)."""
        keys = self.pool[loc].get(param)
        return keys[0] if keys else None


def _model_keys(files: AdapterFiles, where: str) -> dict[str, str]:
    """key as AdapterHub's loader sees it -> key in the file: a flex-head model's `transformer.` is stripped,
    which AdapterHub does only when the file's keys have it (a file mixing both forms is refused)."""
    prefixed = [k.startswith(MODEL_PREFIX) for k in files.tensors]
    if not any(prefixed):
        return {k: k for k in files.tensors}
    if not all(prefixed):
        odd = next(k for k in files.tensors if not k.startswith(MODEL_PREFIX))
        raise UnsupportedAdapterError(f"{where}: unexpected tensor {odd!r}: the other keys start with "
                                      f"{MODEL_PREFIX!r} (a flex-head model's), and AdapterHub's loader then skips "
                                      "keys without it; re-save the adapter from one model")
    return {k[len(MODEL_PREFIX):]: k for k in files.tensors}


def _attentions(base: BaseDescription) -> set[str]:
    """The base's attention modules (where AdapterHub hangs the prefix pool and prefix gates)."""
    return {p.rsplit(".", 1)[0] for p in base.linear_shapes if p.endswith("Attention.q")}


def _parse_keys(files: AdapterFiles, cfg: AdapterHubConfig, base: BaseDescription) -> _Parsed:
    where = f"adapter {files.path}"
    out = _Parsed()
    attentions = _attentions(base)
    for key, stored in _model_keys(files, where).items():
        m = POOL_KEY.match(key)
        if m:
            _check_name(m["name"], cfg, stored, where)
            if m["layer"] is not None and m["layer"] not in attentions:
                raise AdapterMismatchError(f"{where}: tensor {stored!r} is under {m['layer']}, which base "
                                           f"{base.name!r} does not have; the adapter was trained for another model")
            out.pool[m["loc"]][m["param"]].append(stored)
            continue
        m = LINEAR_KEY.match(key) or PREFIX_GATE_KEY.match(key) or BOTTLENECK_KEY.match(key)
        if m is None:
            raise UnsupportedAdapterError(f"{where}: unexpected tensor {stored!r}; AdapterHub adapters for T5 hold "
                                          "bottleneck ('.adapters.'), LoRA ('.loras.') and prefix-tuning tensors "
                                          "only (heads and fusion layers are not served)")
        _check_name(m["name"], cfg, stored, where)
        stack, block, sub = m["stack"], int(m["block"]), int(m["sub"])
        blocks = base.num_layers if stack == "encoder" else base.num_decoder_layers
        if block >= blocks or sub not in SUBLAYER_LOCATIONS[stack]:
            raise AdapterMismatchError(f"{where}: tensor {stored!r} is for {stack} block {block} sublayer {sub}, which "
                                       f"base {base.name!r} does not have ({blocks} {stack} blocks); the adapter "
                                       "was trained for another model")
        place = f"{stack}.block.{block}.layer.{sub}"
        if m.re is LINEAR_KEY:
            module = f"{place}.{m['module']}"
            if module not in base.linear_shapes:
                raise AdapterMismatchError(f"{where}: {module} is not a linear of base {base.name!r} (a relu T5 has "
                                           "wi, a gated one wi_0/wi_1); the adapter was trained for another model")
            out.linear[module][m["param"]] = stored
        elif m.re is PREFIX_GATE_KEY:
            attention = f"{place}.{m['attn']}"
            if attention not in attentions:
                raise AdapterMismatchError(f"{where}: prefix gate {stored!r} is on {attention}, which base "
                                           f"{base.name!r} does not have; the adapter was trained for another model")
            out.prefix_gates[attention][m["param"]] = stored
        else:
            out.bottleneck[place][m["param"]] = stored
    if not files.tensors:
        raise UnsupportedAdapterError(f"{where}: {files.weights.name} holds no adapter tensors")
    return out


def _check_name(found: str, cfg: AdapterHubConfig, key: str, where: str) -> None:
    if found != cfg.name:
        raise CorruptAdapterError(f"{where}: tensor {key!r} belongs to adapter {found!r} but adapter_config.json "
                                  f"names {cfg.name!r}; AdapterHub keys carry the adapter's name, re-save it")


def _shape(files: AdapterFiles, key: str | None, expected: tuple[int, ...], what: str) -> None:
    got = None if key is None else tuple(files.tensors[key].shape)
    if got != expected:
        state = "missing" if key is None else f"has shape {list(got)}"
        raise AdapterMismatchError(f"adapter {files.path}: {what} {state}, expected {list(expected)} for this base; "
                                   "the adapter was trained for another model or its config changed")


# ---- per method: check the header against the config and the base ------------------------------------

def _bottleneck_params(cfg: BottleneckConfig) -> dict[str, str]:
    """role -> AdapterHub parameter name. With ln_before the down projection is adapter_down.1 (the layer
    norm is adapter_down.0, also registered as adapter_norm_before)."""
    down = "adapter_down.1" if cfg.ln_before else "adapter_down.0"
    params = {"down": f"{down}.weight", "down_bias": f"{down}.bias", "up": "adapter_up.weight",
              "up_bias": "adapter_up.bias"}
    if cfg.ln_before:
        params |= {"ln_before": "adapter_norm_before.weight", "ln_before_bias": "adapter_norm_before.bias"}
    if cfg.ln_after:
        params |= {"ln_after": "adapter_norm_after.weight", "ln_after_bias": "adapter_norm_after.bias"}
    if cfg.use_gating:
        params |= {"gate": "gate.weight", "gate_bias": "gate.bias"}
    if cfg.scaling in ("learned", "channel"):
        params["scaling"] = "scaling"
    return params


def _find(params: dict[str, str], name: str) -> str | None:
    if name in params:
        return params[name]
    alias = {"adapter_norm_before.weight": "adapter_down.0.weight", "adapter_norm_before.bias": "adapter_down.0.bias"}
    return params.get(alias.get(name, ""))


def _check_bottleneck(files, cfg: BottleneckConfig, parsed: _Parsed, base: BaseDescription, limits) -> int:
    where = f"adapter {files.path}"
    if not parsed.bottleneck:
        raise AdapterMismatchError(f"{where}: the config has a bottleneck adapter but the weights hold none")
    expected = {f"{stack}.block.{b}.layer.{sub}" for stack, subs in SUBLAYER_LOCATIONS.items()
                for b in range(base.num_layers if stack == "encoder" else base.num_decoder_layers)
                for sub, location in subs.items()
                if getattr(cfg, location) and layer_number(stack, b, base) not in cfg.leave_out}
    missing = sorted(expected - set(parsed.bottleneck))
    if missing:
        raise AdapterMismatchError(f"{where}: the config (mh_adapter/output_adapter/cross_adapter, leave_out) puts "
                                   f"a bottleneck adapter at {missing[0]}, but the weights hold none there; re-save it")
    d, largest = base.d_model, 0
    for place, params in parsed.bottleneck.items():
        stack, _, block, _, sub = place.split(".")
        location = SUBLAYER_LOCATIONS[stack][int(sub)]
        if not getattr(cfg, location) or layer_number(stack, int(block), base) in cfg.leave_out:
            raise AdapterMismatchError(f"{where}: weights for a {location} at {place}, where the config puts no "
                                       "adapter (mh_adapter/output_adapter/cross_adapter, leave_out); re-save it")
        k = max(1, int(d // cfg.reduction_for(layer_number(stack, int(block), base))))
        largest = max(largest, k)
        roles = _bottleneck_params(cfg)
        known = set(roles.values()) | {"adapter_down.0.weight", "adapter_down.0.bias"}
        stray = sorted(set(params) - known)
        if stray:
            raise UnsupportedAdapterError(f"{where}: unexpected bottleneck tensor {place}...{stray[0]!r} for this "
                                          "config (PHM, invertible or fusion weights are not served)")
        expect = {"down": (k, d), "down_bias": (k,), "up": (d, k), "up_bias": (d,), "ln_before": (d,),
                  "ln_before_bias": (d,), "ln_after": (d,), "ln_after_bias": (d,), "gate": (1, d), "gate_bias": (1,),
                  "scaling": (1,) if cfg.scaling == "learned" else (d,)}
        for role, name in roles.items():
            _shape(files, _find(params, name), expect[role], f"{place} bottleneck {name}")
    if largest > limits.max_bottleneck:
        raise AdapterLimitError(f"{where}: a bottleneck of {largest} units is above this server's max_bottleneck="
                                f"{limits.max_bottleneck}; use a larger reduction_factor or raise the limit")
    return largest


def _expected_linears(cfg: LinearConfig, base: BaseDescription) -> set[str]:
    """AdapterHub's T5 LoRA locations, as module paths of this base."""
    out = set()
    gated = any(p.endswith(".wi_1") for p in base.linear_shapes)  # AdapterHub wraps wi_1 of a gated FFN, not wi_0
    for path in base.linear_shapes:
        stack, _, block = path.split(".")[:3]
        if layer_number(stack, int(block), base) in cfg.leave_out:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if ".SelfAttention." in path or ".EncDecAttention." in path:
            if cfg.selfattn_lora and leaf in cfg.attn_matrices:
                out.add(path)
        elif leaf == "wo":
            if cfg.output_lora:
                out.add(path)
        elif cfg.intermediate_lora and leaf == ("wi_1" if gated else "wi"):
            out.add(path)
    return out


def _check_linear(files, cfg: LinearConfig, parsed: _Parsed, base: BaseDescription, limits) -> None:
    where = f"adapter {files.path}"
    expected = _expected_linears(cfg, base)
    if set(parsed.linear) != expected:
        odd = sorted(set(parsed.linear) ^ expected)
        raise AdapterMismatchError(f"{where}: LoRA tensors and config disagree at {odd[0]} (the config's "
                                   "selfattn_lora/intermediate_lora/output_lora/attn_matrices/leave_out name other "
                                   "modules); re-save the adapter")
    if cfg.r > limits.max_rank:
        raise AdapterLimitError(f"{where}: rank {cfg.r} is above this server's max_rank={limits.max_rank}; retrain "
                                "with a lower rank or raise the limit")
    for module, params in parsed.linear.items():
        fan_in, fan_out = base.linear_shapes[module]
        if cfg.composition_mode == "add":
            _shape(files, params.get("lora_A"), (cfg.r, fan_in), f"{module} lora_A")
        elif "lora_A" in params:
            raise UnsupportedAdapterError(f"{where}: {module} has a lora_A, which (IA)3 (composition_mode 'scale') "
                                          "does not use")
        _shape(files, params.get("lora_B"), (fan_out, cfg.r), f"{module} lora_B")
        if cfg.use_gating:
            _shape(files, params.get("gate.weight"), (1, fan_in), f"{module} gate.weight")
            _shape(files, params.get("gate.bias"), (1,), f"{module} gate.bias")
        elif "gate.weight" in params:
            raise AdapterMismatchError(f"{where}: {module} has a gate but the config says use_gating=false")


def prefix_layers(location: str, base: BaseDescription) -> int:
    return base.num_layers if location == "encoder_prefix" else base.num_decoder_layers


def _prefix_locations(cfg: PrefixConfig) -> list[str]:
    return [loc for loc, on in (("encoder_prefix", cfg.encoder_prefix), ("self_prefix", True),
                                ("cross_prefix", cfg.cross_prefix)) if on]


def _check_prefix(files, cfg: PrefixConfig, parsed: _Parsed, base: BaseDescription, limits) -> None:
    where = f"adapter {files.path}"
    if cfg.leave_out:
        raise UnsupportedAdapterError(
            f"{where}: prefix tuning with leave_out={list(cfg.leave_out)} is not served: AdapterHub's T5 then gives "
            "the layers whose key length differs from layer 0's no position bias at all, which no KV cache "
            "reproduces faithfully; retrain with the prefix in every layer")
    if cfg.prefix_length > limits.max_prefix_tokens:
        raise AdapterLimitError(f"{where}: a {cfg.prefix_length}-token prefix is above this server's "
                                f"max_prefix_tokens={limits.max_prefix_tokens}; retrain shorter or raise the limit")
    locations = _prefix_locations(cfg)
    if set(parsed.pool) != set(locations):
        raise AdapterMismatchError(f"{where}: prefix tensors for {sorted(parsed.pool)} but the config "
                                   f"(encoder_prefix/cross_prefix) describes {locations}; re-save the adapter")
    d, inner = base.d_model, base.num_heads * base.d_kv
    for loc in locations:
        width = prefix_layers(loc, base) * 2 * inner
        n, b = cfg.prefix_length, cfg.bottleneck_size
        shapes = ({"control_trans": (n * width,)} if cfg.flat else
                  dict(zip(POOL_PARAMS_MLP, ((n, d), (b, d), (b,), (width, b), (width,)), strict=True)))
        stray = sorted(set(parsed.pool[loc]) - set(shapes))
        if stray:
            raise AdapterMismatchError(f"{where}: prefix tensor {parsed.pool[loc][stray[0]][0]!r} is not part of the "
                                       f"config's prefix ({'flat' if cfg.flat else 'MLP'}: {', '.join(shapes)}); "
                                       "re-save the adapter")
        for name, shape in shapes.items():
            for key in parsed.pool[loc].get(name) or [None]:
                _shape(files, key, shape, f"{loc} {name}")
    _check_pool_copies(files, parsed)
    gates = parsed.prefix_gates
    if not cfg.use_gating:
        if gates:
            raise AdapterMismatchError(f"{where}: prefix gates present but the config says use_gating=false")
        return
    outs = 1 if cfg.shared_gating else 2
    expected = set()
    for loc in locations:
        stack, sub, attn = PREFIX_LOCATIONS[loc]
        for block in range(prefix_layers(loc, base)):
            expected.add(f"{stack}.block.{block}.layer.{sub}.{attn}")
            params = gates.get(f"{stack}.block.{block}.layer.{sub}.{attn}", {})
            _shape(files, params.get("weight"), (outs, d), f"{loc} gate of block {block}")
            _shape(files, params.get("bias"), (outs,), f"{loc} gate bias of block {block}")
    stray = sorted(set(gates) - expected)
    if stray:
        raise AdapterMismatchError(f"{where}: a prefix gate on {stray[0]}, where the config "
                                   "(encoder_prefix/cross_prefix) puts no prefix; re-save the adapter")


def _check_pool_copies(files: AdapterFiles, parsed: _Parsed) -> None:
    """A pool tensor stored under several keys (model-level, per layer) must hold one value: AdapterHub would
    silently load whichever copy it visits last. Only the copies are read (header-only otherwise)."""
    copies = [keys for params in parsed.pool.values() for keys in params.values() if len(keys) > 1]
    if not copies:
        return
    from safetensors import safe_open

    with safe_open(str(files.weights), framework="pt") as f:
        for keys in copies:
            first = f.get_tensor(keys[0]).to(torch.float32)
            for other in keys[1:]:
                if not _same(first, f.get_tensor(other).to(torch.float32)):
                    raise CorruptAdapterError(
                        f"adapter {files.path}: {keys[0]!r} and {other!r} are copies of one prefix tensor (AdapterHub "
                        "shares its prefix pool between the model and every attention layer) but hold different "
                        "values; keep one copy (or make them equal) and re-save the adapter")


# ---- the kind's interface (see adapters/loading.py) ----------------------------------------------------

def _kind(cfg: AdapterHubConfig) -> AdapterKind:
    linear = cfg.of(LinearConfig)
    if not cfg.union and linear is not None and not linear.use_gating:
        return AdapterKind.IA3 if linear.composition_mode == "scale" else AdapterKind.LORA
    return AdapterKind.ADAPTERHUB


def inspect(files: AdapterFiles, base: BaseDescription, limits: AdapterLimits, name: str) -> AdapterSpec:
    cfg = parse_config(files.config, files.path)
    if cfg.hidden_size is not None and cfg.hidden_size != base.d_model:
        raise AdapterMismatchError(f"adapter {files.path}: made for hidden_size {cfg.hidden_size}, but base "
                                   f"{base.name!r} has d_model {base.d_model}; use the base it was trained on")
    parsed = _parse_keys(files, cfg, base)
    options: dict = {"format": "adapterhub", "architecture": cfg.method,
                     "components": [c.method for c in cfg.components],
                     "gated": [c.method for c in cfg.components if c.use_gating]}
    bottleneck, prefix, linear = cfg.of(BottleneckConfig), cfg.of(PrefixConfig), cfg.of(LinearConfig)
    if bottleneck is not None:
        options["bottleneck_size"] = _check_bottleneck(files, bottleneck, parsed, base, limits)
        options["bottleneck_places"] = len(parsed.bottleneck)
    elif parsed.bottleneck:
        raise AdapterMismatchError(f"adapter {files.path}: bottleneck tensors but no bottleneck config")
    if prefix is not None:
        _check_prefix(files, prefix, parsed, base, limits)
        options["prefix_locations"] = _prefix_locations(prefix)
    elif parsed.pool or parsed.prefix_gates:
        raise AdapterMismatchError(f"adapter {files.path}: prefix tensors but no prefix-tuning config")
    if linear is not None:
        _check_linear(files, linear, parsed, base, limits)
    elif parsed.linear:
        raise AdapterMismatchError(f"adapter {files.path}: LoRA tensors but no LoRA config")
    modules = tuple(sorted(parsed.linear))
    notes = ["AdapterHub format; prediction-head files, if any, are ignored"]
    if any(c.use_gating for c in cfg.components):
        notes.append("gates served incrementally, as AdapterHub's cached generate computes them: a decoder "
                     "step's gates come from that step's token; encoder gates average the row's real tokens")
    kind = _kind(cfg)
    return AdapterSpec(
        name=name, kind=kind, rank=linear.r if linear is not None and linear.composition_mode == "add" else None,
        targets=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        num_virtual_tokens=prefix.prefix_length if prefix is not None else None, size_bytes=files.size_bytes,
        base_model=files.config.get("model_name") if isinstance(files.config.get("model_name"), str) else None,
        path=str(files.path), modules=modules, notes=tuple(notes), options=options,
        method=cfg.method if kind == AdapterKind.ADAPTERHUB else None)


def _activation_fn(name: str):
    from transformers.activations import get_activation

    if name == "leakyrelu":
        return torch.nn.functional.leaky_relu
    if name == "linear":
        return lambda x: x
    return get_activation(name)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (a NaN copy is the NaN check's business, not a conflict)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _prefix_place(cfg: PrefixConfig, loc: str, parsed: _Parsed, tensors, base) -> PrefixPlace:
    layers, heads, d_kv, n = prefix_layers(loc, base), base.num_heads, base.d_kv, cfg.prefix_length

    def pool(param: str) -> torch.Tensor:
        return tensors[parsed.pool_key(loc, param)]

    gates = parsed.prefix_gates
    with torch.no_grad():
        if cfg.flat:
            flat = pool("control_trans")
        else:  # the reparametrisation MLP, once, here: wte -> Linear -> act -> Linear
            act = _activation_fn(cfg.non_linearity)
            h = act(torch.nn.functional.linear(pool("wte.weight"), pool("control_trans.0.weight"),
                                               pool("control_trans.0.bias")))
            flat = torch.nn.functional.linear(h, pool("control_trans.2.weight"), pool("control_trans.2.bias"))
        table = flat.reshape(n, layers * 2, heads, d_kv)
    place = PrefixPlace(keys=table[:, 0::2].transpose(0, 1).contiguous(), values=table[:, 1::2].transpose(0, 1).contiguous())
    if cfg.use_gating:
        stack, sub, attn = PREFIX_LOCATIONS[loc]
        w, b = [], []
        for block in range(layers):
            g = gates[f"{stack}.block.{block}.layer.{sub}.{attn}"]
            gw, gb = tensors[g["weight"]], tensors[g["bias"]]
            # AdapterHub scales keys by output 0 and values by output -1: one output serves both when shared
            w.append(torch.stack([gw[0], gw[-1]]))
            b.append(torch.stack([gb[0], gb[-1]]))
        place.gate_weight, place.gate_bias = torch.stack(w), torch.stack(b)
    return place


def _bottleneck_weights(cfg: BottleneckConfig, params: dict[str, str], tensors, d: int) -> BottleneckWeights:
    roles = _bottleneck_params(cfg)

    def get(role):
        return tensors[_find(params, roles[role])]

    if cfg.scaling == "learned":
        scale = get("scaling").expand(d).clone()
    elif cfg.scaling == "channel":
        scale = get("scaling").clone()
    else:
        scale = torch.full((d,), float(cfg.scaling))
    return BottleneckWeights(
        down=get("down"), down_bias=get("down_bias"), up=get("up"), up_bias=get("up_bias"), scale=scale,
        ln_before=(get("ln_before"), get("ln_before_bias")) if cfg.ln_before else None,
        ln_after=(get("ln_after"), get("ln_after_bias")) if cfg.ln_after else None,
        gate=(get("gate")[0], get("gate_bias")) if cfg.use_gating else None)


def build(spec: AdapterSpec, files: AdapterFiles, tensors: dict[str, torch.Tensor], base: BaseDescription):
    cfg = parse_config(files.config, files.path)
    parsed = _parse_keys(files, cfg, base)
    lora = ia3 = None
    gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    linear = cfg.of(LinearConfig)
    if linear is not None:
        # gated: the gate replaces alpha / r (LoRA) or alpha ((IA)3), as in AdapterHub's forward
        if linear.composition_mode == "add":
            scale = 1.0 if linear.use_gating else linear.alpha / linear.r
            lora = LoraWeights(spec=spec, a={m: tensors[p["lora_A"]].contiguous() for m, p in parsed.linear.items()},
                               b={m: (tensors[p["lora_B"]] * scale).contiguous() for m, p in parsed.linear.items()})
        else:
            scale = 1.0 if linear.use_gating else linear.alpha
            ia3 = IA3Weights(spec=spec, vectors={m: (tensors[p["lora_B"]].flatten() * scale).contiguous()
                                                 for m, p in parsed.linear.items()},
                             feedforward={m: False for m in parsed.linear})
        if linear.use_gating:
            gates = {m: (tensors[p["gate.weight"]][0], tensors[p["gate.bias"]]) for m, p in parsed.linear.items()}
    if spec.kind == AdapterKind.LORA:
        return lora
    if spec.kind == AdapterKind.IA3:
        return ia3
    out = AdapterHubWeights(spec=spec, lora=lora, ia3=ia3, linear_gates=gates)
    bottleneck = cfg.of(BottleneckConfig)
    if bottleneck is not None:
        out.form = BottleneckForm(bottleneck.non_linearity, bottleneck.is_parallel, bottleneck.original_ln_before,
                                  bottleneck.original_ln_after, bottleneck.residual_before_ln,
                                  bottleneck.adapter_residual_before_ln)
        out.bottlenecks = {place: _bottleneck_weights(bottleneck, params, tensors, base.d_model)
                           for place, params in parsed.bottleneck.items()}
    prefix = cfg.of(PrefixConfig)
    if prefix is not None:
        out.prefixes = {loc: _prefix_place(prefix, loc, parsed, tensors, base) for loc in _prefix_locations(prefix)}
    if not all(math.isfinite(float(t.abs().max())) for p in out.prefixes.values() for t in (p.keys, p.values)):
        raise CorruptAdapterError(f"adapter {files.path}: the prefix MLP gives non-finite keys/values")
    return out
