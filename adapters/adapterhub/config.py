"""AdapterHub's adapter_config.json, read into small frozen dataclasses (one per method) and validated.

AdapterHub (`adapters` 1.3) writes {"config": {...}, "hidden_size", "model_class", "model_type", "name",
"version": "adapters.x.y"}. `config` is one method's full config, or {"architecture": "union", "configs":
[...]} for unions (UniPELT, MAM, or any ConfigUnion). The method is told by `architecture`: "prefix_tuning",
"lora" (LoRA with composition_mode "add", (IA)3 with "scale"), or none at all for bottleneck adapters (BnConfig
has architecture None; `is_parallel` separates the parallel adapter).

Options that change the math are either reproduced or refused by name; options that only matter in
training (dropout, init_weights, stochastic_depth, init_weights_seed) are ignored, as AdapterHub's eval
forward ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptAdapterError, UnsupportedAdapterError

# Non-linearities AdapterHub resolves with transformers' get_activation (plus its own "leakyrelu").
ACTIVATIONS = ("relu", "swish", "silu", "gelu", "gelu_new", "gelu_fast", "gelu_python", "quick_gelu", "tanh",
               "sigmoid", "relu6", "leakyrelu", "linear", "mish", "gelu_pytorch_tanh", "relu2")


@dataclass(frozen=True)
class BottleneckConfig:
    """BnConfig: seq_bn (Pfeiffer), double_seq_bn (Houlsby), par_bn (parallel, with scaling) and variants."""

    mh_adapter: bool
    output_adapter: bool
    cross_adapter: bool
    reduction_factor: float | dict  # a number, or {"<layer>": n, ..., "default": n}
    non_linearity: str
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    adapter_residual_before_ln: bool
    ln_before: bool
    ln_after: bool
    is_parallel: bool
    scaling: float | str  # a number, "learned" (one scalar) or "channel" (one per hidden unit)
    use_gating: bool
    leave_out: tuple[int, ...]

    @property
    def method(self) -> str:
        if self.is_parallel:
            return "par_bn"
        return "double_seq_bn" if self.mh_adapter and self.output_adapter else "seq_bn"

    def reduction_for(self, layer: int) -> float:
        rf = self.reduction_factor
        if isinstance(rf, dict):
            return float(rf.get(str(layer), rf["default"]))
        return float(rf)


@dataclass(frozen=True)
class PrefixConfig:
    """PrefixTuningConfig: prefixes on encoder self-attention, decoder self-attention and cross-attention."""

    prefix_length: int
    encoder_prefix: bool
    cross_prefix: bool
    flat: bool
    bottleneck_size: int
    non_linearity: str
    use_gating: bool
    shared_gating: bool
    leave_out: tuple[int, ...]

    method = "prefix_tuning"


@dataclass(frozen=True)
class LinearConfig:
    """LoRAConfig: LoRA (composition_mode "add") or (IA)3 ("scale") on AdapterHub's T5 locations:
    selfattn = q/k/v (per `attn_matrices`) of every attention, self and cross; intermediate = wi (wi_1 in
    gated FFNs); output = wo."""

    r: int
    alpha: float
    composition_mode: str
    attn_matrices: tuple[str, ...]
    selfattn_lora: bool
    intermediate_lora: bool
    output_lora: bool
    use_gating: bool
    leave_out: tuple[int, ...]

    @property
    def method(self) -> str:
        return "ia3" if self.composition_mode == "scale" else "lora"


MethodConfig = BottleneckConfig | PrefixConfig | LinearConfig


@dataclass(frozen=True)
class AdapterHubConfig:
    name: str  # the adapter's name inside AdapterHub's tensor keys
    components: tuple[MethodConfig, ...]
    union: bool
    hidden_size: int | None
    model_type: str | None

    @property
    def method(self) -> str:
        """unipelt, mam, a plain method name, or "union" for any other ConfigUnion."""
        if not self.union:
            only = self.components[0]
            return f"gated_{only.method}" if isinstance(only, LinearConfig) and only.use_gating else only.method
        kinds = sorted(type(c).__name__ for c in self.components)
        gated = all(c.use_gating for c in self.components)
        seq = [c for c in self.components if isinstance(c, BottleneckConfig)]
        if kinds == ["BottleneckConfig", "LinearConfig", "PrefixConfig"] and gated and not seq[0].is_parallel:
            return "unipelt"
        if kinds == ["BottleneckConfig", "PrefixConfig"] and seq[0].is_parallel:
            return "mam"
        return "union"

    def of(self, cls):
        return next((c for c in self.components if isinstance(c, cls)), None)


def is_adapterhub_config(config: dict) -> bool:
    """AdapterHub's layout: the method config nested under "config", and a version "adapters.x" (or its
    model_type/hidden_size envelope) instead of peft's top-level peft_type."""
    if "peft_type" in config or not isinstance(config.get("config"), dict):
        return False
    version = config.get("version")
    return (isinstance(version, str) and version.startswith("adapters")) or "model_type" in config


# Options AdapterHub offers whose math peftserve does not reproduce (truthy = used).
_UNSUPPORTED_BN = {"phm_layer": "Compacter's PHM layers", "inv_adapter": "invertible adapters",
                   "shared_W_phm": "shared PHM weights"}
_UNSUPPORTED_LINEAR = {"use_dora": "AdapterHub's DoRA", "vera_d": "VeRA", "vera_b": "VeRA",
                       "n_up_projection": "MTL-LoRA"}


def _field(raw: dict, key: str, default, kind, where: str):
    value = raw.get(key, default)
    ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and isinstance(value, bool))
    if not ok:
        raise CorruptAdapterError(f"{where}: {key}={value!r} must be {getattr(kind, '__name__', 'a number')}; "
                                  "re-save the adapter with AdapterHub's save_adapter")
    return value


def _leave_out(raw: dict, where: str) -> tuple[int, ...]:
    value = raw.get("leave_out") or []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise CorruptAdapterError(f"{where}: leave_out={value!r} must be a list of layer indices")
    return tuple(sorted(set(value)))


def _activation(raw: dict, key: str, default: str, where: str) -> str:
    value = raw.get(key, default)
    if value is None:
        return "linear"
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        raise UnsupportedAdapterError(f"{where}: {key}={value!r} is not a non-linearity peftserve serves "
                                      f"({', '.join(ACTIVATIONS)})")
    return value.lower()


def _refuse(raw: dict, options: dict[str, str], where: str) -> None:
    for key, what in options.items():
        if raw.get(key):
            raise UnsupportedAdapterError(f"{where}: {key}={raw[key]!r} ({what}) is not served; retrain without it")


def _bottleneck(raw: dict, where: str) -> BottleneckConfig:
    _refuse(raw, _UNSUPPORTED_BN, where)
    rf = raw.get("reduction_factor")
    if isinstance(rf, dict):
        if "default" not in rf or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                                          for v in rf.values()):
            raise CorruptAdapterError(f"{where}: reduction_factor mapping {rf!r} needs positive numbers and a "
                                      "'default' entry (AdapterHub's own rule)")
    elif not isinstance(rf, int | float) or isinstance(rf, bool) or rf <= 0:
        raise CorruptAdapterError(f"{where}: reduction_factor={rf!r} must be a positive number or a mapping")
    scaling = raw.get("scaling", 1.0)
    if not (isinstance(scaling, int | float) and not isinstance(scaling, bool)) and scaling not in ("learned", "channel"):
        raise UnsupportedAdapterError(f"{where}: scaling={scaling!r}; AdapterHub accepts a number, 'learned' or "
                                      "'channel'")
    rbl = raw.get("residual_before_ln", True)
    if rbl not in (True, False):
        raise UnsupportedAdapterError(f"{where}: residual_before_ln={rbl!r} is not served on T5 (AdapterHub itself "
                                      "fails there: T5 passes no layer norm); use true or false")
    flags = {k: bool(_field(raw, k, d, bool, where)) for k, d in (
        ("mh_adapter", False), ("output_adapter", True), ("cross_adapter", False), ("original_ln_before", False),
        ("original_ln_after", True), ("adapter_residual_before_ln", False), ("ln_before", False),
        ("ln_after", False), ("is_parallel", False), ("use_gating", False))}
    return BottleneckConfig(reduction_factor=rf, non_linearity=_activation(raw, "non_linearity", "relu", where),
                            residual_before_ln=bool(rbl), scaling=scaling if isinstance(scaling, str) else float(scaling),
                            leave_out=_leave_out(raw, where), **flags)


def _prefix(raw: dict, where: str) -> PrefixConfig:
    n = _field(raw, "prefix_length", 30, int, where)
    size = _field(raw, "bottleneck_size", 512, int, where)
    if n <= 0 or size <= 0:
        raise CorruptAdapterError(f"{where}: prefix_length and bottleneck_size must be positive")
    return PrefixConfig(prefix_length=n, bottleneck_size=size,
                        encoder_prefix=bool(_field(raw, "encoder_prefix", True, bool, where)),
                        cross_prefix=bool(_field(raw, "cross_prefix", True, bool, where)),
                        flat=bool(_field(raw, "flat", False, bool, where)),
                        non_linearity=_activation(raw, "non_linearity", "tanh", where),
                        use_gating=bool(_field(raw, "use_gating", False, bool, where)),
                        shared_gating=bool(_field(raw, "shared_gating", True, bool, where)),
                        leave_out=_leave_out(raw, where))


def _linear(raw: dict, where: str) -> LinearConfig:
    _refuse(raw, _UNSUPPORTED_LINEAR, where)
    mode = raw.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        raise UnsupportedAdapterError(f"{where}: composition_mode={mode!r}; AdapterHub has 'add' (LoRA) and "
                                      "'scale' ((IA)3)")
    r = _field(raw, "r", 8, int, where)
    if r <= 0 or (mode == "scale" and r != 1):
        raise CorruptAdapterError(f"{where}: r={r} must be positive (and 1 for composition_mode 'scale')")
    matrices = raw.get("attn_matrices", ["q", "v"])
    if not isinstance(matrices, list) or not set(matrices) <= {"q", "k", "v"}:
        raise UnsupportedAdapterError(f"{where}: attn_matrices={matrices!r}; T5 attention has q, k and v")
    return LinearConfig(r=r, alpha=float(_field(raw, "alpha", 8, (int, float), where)), composition_mode=mode,
                        attn_matrices=tuple(matrices),
                        selfattn_lora=bool(_field(raw, "selfattn_lora", True, bool, where)),
                        intermediate_lora=bool(_field(raw, "intermediate_lora", False, bool, where)),
                        output_lora=bool(_field(raw, "output_lora", False, bool, where)),
                        use_gating=bool(_field(raw, "use_gating", False, bool, where)),
                        leave_out=_leave_out(raw, where))


def _component(raw, where: str) -> MethodConfig:
    if not isinstance(raw, dict):
        raise CorruptAdapterError(f"{where}: a method config must be a JSON object, got {type(raw).__name__}")
    arch = raw.get("architecture")
    if arch == "prefix_tuning":
        return _prefix(raw, where)
    if arch == "lora":
        return _linear(raw, where)
    if arch in (None, "bottleneck") and "reduction_factor" in raw:
        return _bottleneck(raw, where)
    raise UnsupportedAdapterError(f"{where}: AdapterHub architecture {arch!r} is not served; peftserve serves "
                                  "bottleneck adapters, prefix tuning, LoRA, (IA)3 and their unions")


def parse_config(config: dict, path: Path) -> AdapterHubConfig:
    where = f"adapter {path}"
    inner = config["config"]
    if inner.get("architecture") == "union":
        parts = inner.get("configs")
        if not isinstance(parts, list) or not parts:
            raise CorruptAdapterError(f"{where}: a union config needs a non-empty 'configs' list")
        components = tuple(_component(c, f"{where} (union part {i})") for i, c in enumerate(parts))
        union = True
    else:
        components = (_component(inner, where),)
        union = False
    seen: dict[type, int] = {}
    for c in components:
        seen[type(c)] = seen.get(type(c), 0) + 1
    if any(n > 1 for n in seen.values()):
        raise UnsupportedAdapterError(f"{where}: a union with two configs of one method is not served (AdapterHub "
                                      "would stack them); keep one bottleneck, one prefix and one LoRA/(IA)3 at most")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CorruptAdapterError(f"{where}: adapter_config.json needs the adapter's 'name' (its tensor keys "
                                  "carry it); re-save with AdapterHub's save_adapter")
    hidden = config.get("hidden_size")
    model_type = config.get("model_type")
    if model_type not in (None, "t5", "mt5"):
        raise UnsupportedAdapterError(f"{where}: model_type {model_type!r}: the adapter was made for another "
                                      "architecture; peftserve serves T5 adapters")
    return AdapterHubConfig(name=name, components=components, union=union,
                            hidden_size=hidden if isinstance(hidden, int) else None, model_type=model_type)
