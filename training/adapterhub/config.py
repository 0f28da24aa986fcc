"""AdapterHub (adapters 1.3.0) configurations as plain dicts: what each `--method` builds and what
adapter_config.json records.

Every dict is complete, field for field what AdapterHub's `to_dict()` writes (the oracle test compares them),
so AdapterHub's `load_adapter` rebuilds exactly the modules that were trained. No AdapterHub import: it pins
transformers 4.57.
"""

from __future__ import annotations

import copy

from training.config import Selection, TrainConfig, resolve_selection
from training.errors import TrainConfigError

VERSION = "adapters.1.3.0"

# SeqBnConfig() (Pfeiffer); the other bottleneck architectures differ only in the fields they override
SEQ_BN = {
    "mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
    "original_ln_before": True, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}
BN_ARCHS = {
    "seq_bn": SEQ_BN,
    "double_seq_bn": {**SEQ_BN, "mh_adapter": True, "non_linearity": "swish", "original_ln_before": False},
    "par_bn": {**SEQ_BN, "original_ln_before": False, "reduction_factor": 2, "init_weights": "mam_adapter",
               "is_parallel": True, "scaling": 4.0},
}
PREFIX = {  # PrefixTuningConfig()
    "architecture": "prefix_tuning", "encoder_prefix": True, "cross_prefix": True, "leave_out": [], "flat": False,
    "prefix_length": 30, "bottleneck_size": 512, "non_linearity": "tanh", "dropout": 0.0, "use_gating": False,
    "shared_gating": True, "init_weights_seed": None,
}
LORA = {  # LoRAConfig()
    "architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False,
    "leave_out": [], "r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
    "init_weights": "lora", "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None,
    "vera_b": None, "dtype": None,
}
# Where each kind acts, by sublayer kind: what --module-groups attention / feed-forward switch off
LOCATIONS = {"bottleneck": {"attention": ("mh_adapter", "cross_adapter"), "feed-forward": ("output_adapter",)},
             "lora": {"attention": ("selfattn_lora",), "feed-forward": ("intermediate_lora", "output_lora")}}


def kind(part: dict) -> str:
    """'bottleneck', 'prefix_tuning' or 'lora' (AdapterHub's BnConfig has no architecture field)."""
    return part.get("architecture") or "bottleneck"


def parts(config: dict) -> list[dict]:
    """The single configs of `config` (a ConfigUnion's members, in order, or the config itself)."""
    return list(config["configs"]) if config.get("architecture") == "union" else [config]


def union(*configs: dict) -> dict:
    return {"architecture": "union", "configs": list(configs)}


def bottleneck(arch: str, reduction_factor: float | None, **changes) -> dict:
    out = {**copy.deepcopy(BN_ARCHS[arch]), **changes}
    if reduction_factor is not None:
        out["reduction_factor"] = reduction_factor
    return out


def prefix(cfg: TrainConfig, bottleneck_size: int, **changes) -> dict:
    return {**copy.deepcopy(PREFIX), "prefix_length": cfg.num_virtual_tokens,
            "bottleneck_size": cfg.prefix_hidden_size or bottleneck_size, **changes}


def method_config(cfg: TrainConfig) -> dict:
    """The AdapterHub config `cfg.method` trains, before any layer selection (AdapterHub's defaults, with the
    size flags --reduction-factor / --num-virtual-tokens / --prefix-hidden-size / --lora-rank applied)."""
    rf = cfg.reduction_factor
    if cfg.method == "adapter":
        return bottleneck(cfg.adapter_arch or "seq_bn", rf)
    if cfg.method == "ah_prefix":
        return prefix(cfg, PREFIX["bottleneck_size"])
    if cfg.method == "mam":  # MAMConfig: PrefixTuningConfig(bottleneck_size=800) + ParBnConfig()
        return union(prefix(cfg, 800), bottleneck("par_bn", rf))
    if cfg.method == "unipelt":
        # UniPELTConfig: every member gated; with gating LoRA scales by the gate instead of alpha / r, so
        # AdapterHub's alpha=2 is recorded but acts nowhere (--lora-alpha does not apply)
        return union(prefix(cfg, PREFIX["bottleneck_size"], use_gating=True),
                     bottleneck("seq_bn", rf, use_gating=True),
                     {**copy.deepcopy(LORA), "r": cfg.lora_rank, "alpha": 2, "dropout": cfg.lora_dropout,
                      "use_gating": True})
    raise TrainConfigError(f"--method {cfg.method} is not an AdapterHub method")


def leave_out(selection: Selection, num_layers: int, num_decoder_layers: int) -> list[int]:
    """AdapterHub layer indices the selection drops: encoder blocks are 0..L-1, decoder blocks L..L+D-1
    (its T5 `iter_layers`)."""
    blocks = [("encoder", i, i) for i in range(num_layers)]
    blocks += [("decoder", i, num_layers + i) for i in range(num_decoder_layers)]
    return [index for stack, block, index in blocks if not selection.keeps(stack, block)]


def select(part: dict, selection: Selection, dropped: list[int]) -> dict:
    """One non-prefix member with the selection applied: `leave_out` for layers and stacks, its location
    switches off for a sublayer kind not selected."""
    out = {**part, "leave_out": dropped}
    for group, switches in LOCATIONS[kind(part)].items():
        if group not in selection.kinds:
            out.update(dict.fromkeys(switches, False))
    return out


def switches_on(part: dict) -> list[str]:
    """The location switches of a bottleneck or LoRA member that are on (mh_adapter, selfattn_lora, ...)."""
    return [s for group in LOCATIONS[kind(part)].values() for s in group if part[s]]


def acts_somewhere(part: dict, num_blocks: int) -> bool:
    return kind(part) == "prefix_tuning" or (bool(switches_on(part)) and len(part["leave_out"]) < num_blocks)


def selected_config(cfg: TrainConfig, num_layers: int, num_decoder_layers: int) -> dict:
    """`method_config` with --layers/--module-groups applied to its bottleneck and LoRA members, members left
    with nothing to adapt dropped; a prefix always spans every layer (in AdapterHub's T5 a layer without it
    would get no position bias, or layer 0's computed for another key length). Raises when nothing is left."""
    config = method_config(cfg)
    selection = resolve_selection(cfg, num_layers, num_decoder_layers)
    dropped = leave_out(selection, num_layers, num_decoder_layers)
    chosen = [p if kind(p) == "prefix_tuning" else select(p, selection, dropped) for p in parts(config)]
    kept = [p for p in chosen if acts_somewhere(p, num_layers + num_decoder_layers)]
    if not kept:
        where = "; ".join(f"{kind(p)} at {', '.join(switches_on(p))}" for p in parts(config))
        raise TrainConfigError(f"--method {cfg.method} adapts nothing with --layers {cfg.layers} and --module-groups "
                               f"{','.join(cfg.module_groups) or 'all'} (it acts at: {where})")
    return union(*kept) if config.get("architecture") == "union" else kept[0]


def describe(config: dict) -> str:
    """One line for the model card: each member, its size, gating and the layers it leaves out."""
    def one(p: dict) -> str:
        gated = ", gated" if p["use_gating"] else ""
        left = f", leaves out layers {p['leave_out']}" if p["leave_out"] else ""
        if kind(p) == "prefix_tuning":
            return f"prefix tuning ({p['prefix_length']} tokens through a {p['bottleneck_size']}-wide MLP{gated})"
        if kind(p) == "lora":
            return f"LoRA (rank {p['r']} on {','.join(p['attn_matrices'])}{gated}{left})"
        form = "parallel" if p["is_parallel"] else "sequential"
        return f"{form} bottleneck at {','.join(switches_on(p))} (reduction factor {p['reduction_factor']}{gated}{left})"
    return " + ".join(one(p) for p in parts(config))


def adapter_config_json(config: dict, name: str, base_name: str, d_model: int) -> dict:
    """adapter_config.json as AdapterHub's `save_adapter` writes it (build_full_config)."""
    return {"config": config, "hidden_size": d_model, "model_class": "T5ForConditionalGeneration",
            "model_name": base_name, "model_type": "t5", "name": name, "version": VERSION}
