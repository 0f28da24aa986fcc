"""Layer-wise split of a T5 over several devices by a memory budget per device (pure planner + mover).

`plan_device_map(config, budgets, dtype)` computes every module group's bytes from the config alone
(no weights allocated), then walks the forward order -- embeddings, encoder blocks, encoder final norm,
decoder blocks, decoder final norm, lm_head -- filling devices in order, each up to its proportional share
of the total (never above its budget), so consecutive layers share a device and hops are few.
Per-block extras (KV cache rows, adapter slot tensors) are counted with the block they belong to.
The result is a `device_map` for `from_pretrained` / `apply_device_map`; the decode loop moves hidden
states between devices, and attach_slots allocates each slot tensor on its layer's device.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.engine.errors import ConfigError

EMBEDDING_MODULES = ("shared", "encoder.embed_tokens", "decoder.embed_tokens")
GiB = 2**30


@dataclass(frozen=True)
class Group:
    name: str  # module path ("shared" stands for the three tied embedding modules)
    nbytes: int


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def t5_groups(config, dtype_bytes: int, extra_encoder_block: int = 0, extra_decoder_block: int = 0
              ) -> list[Group]:
    """Module groups of a T5ForConditionalGeneration in forward order with their bytes."""
    d, dkv, h = _get(config, "d_model"), _get(config, "d_kv"), _get(config, "num_heads")
    dff, vocab = _get(config, "d_ff"), _get(config, "vocab_size")
    n_enc = _get(config, "num_layers")
    n_dec = _get(config, "num_decoder_layers") or n_enc
    buckets = _get(config, "relative_attention_num_buckets", 32)
    gated = str(_get(config, "feed_forward_proj", "relu")).startswith("gated")
    inner = h * dkv
    attention = 4 * d * inner + d  # q, k, v, o + layer norm
    ffn = (3 if gated else 2) * d * dff + d
    # transformers 5 reads FLAN-T5's tie_word_embeddings=false as scale_decoder_outputs=False (and then
    # reports tie_word_embeddings=True although the checkpoint's lm_head is its own): trust the scaling flag.
    scaled = _get(config, "scale_decoder_outputs")
    tied = bool(_get(config, "tie_word_embeddings", False) if scaled is None else scaled)

    def block(i: int, cross: bool) -> int:
        params = attention + ffn + (attention if cross else 0) + (buckets * h if i == 0 else 0)
        return params * dtype_bytes

    groups = [Group("shared", vocab * d * dtype_bytes)]
    groups += [Group(f"encoder.block.{i}", block(i, False) + extra_encoder_block) for i in range(n_enc)]
    groups.append(Group("encoder.final_layer_norm", d * dtype_bytes))
    groups += [Group(f"decoder.block.{i}", block(i, True) + extra_decoder_block) for i in range(n_dec)]
    groups.append(Group("decoder.final_layer_norm", d * dtype_bytes))
    groups.append(Group("lm_head", 0 if tied else vocab * d * dtype_bytes))
    return groups


def plan_device_map(config, budgets: dict[str, int], dtype_bytes: int = 2, *, extra_encoder_block: int = 0,
                    extra_decoder_block: int = 0) -> dict[str, str]:
    """Assign module groups to devices (budgets in bytes, in device order). Raises ConfigError if the model
    does not fit, saying how much is missing."""
    if not budgets:
        raise ConfigError("device_memory is empty: give at least one device budget, e.g. {'cuda:0': '20GiB'}")
    groups = t5_groups(config, dtype_bytes, extra_encoder_block, extra_decoder_block)
    total = sum(g.nbytes for g in groups)
    capacity = sum(budgets.values())
    if total > capacity:
        raise ConfigError(f"the model needs {total / GiB:.2f} GiB but the device budgets add up to "
                          f"{capacity / GiB:.2f} GiB; add devices or raise device_memory")
    devices = list(budgets)
    plan: dict[str, str] = {}
    di, used, placed = 0, 0, 0
    for g in groups:
        while True:
            dev = devices[di]
            last = di == len(devices) - 1
            # Proportional share of what is left, so later devices are not starved or overfilled.
            remaining_cap = sum(budgets[x] for x in devices[di:])
            share = (total - placed + used) * budgets[dev] / remaining_cap
            fits_budget = used + g.nbytes <= budgets[dev]
            if fits_budget and (last or used == 0 or used + g.nbytes <= share * 1.0001):
                break
            if last:
                raise ConfigError(f"{g.name} ({g.nbytes / GiB:.2f} GiB) does not fit on {dev} "
                                  f"({(budgets[dev] - used) / GiB:.2f} GiB left); raise device_memory")
            di, used = di + 1, 0
        plan[g.name] = devices[di]
        used += g.nbytes
        placed += g.nbytes
    for alias in EMBEDDING_MODULES[1:]:
        plan[alias] = plan["shared"]
    return plan


def plan_bytes(config, plan: dict[str, str], dtype_bytes: int = 2, **extra) -> dict[str, int]:
    """Bytes per device under `plan` (for info() and tests)."""
    out: dict[str, int] = {}
    for g in t5_groups(config, dtype_bytes, **extra):
        out[plan[g.name]] = out.get(plan[g.name], 0) + g.nbytes
    return out


def apply_device_map(model, device_map: dict[str, str]) -> None:
    """Move each mapped module to its device (idempotent). Unmapped parameters must not remain elsewhere."""
    for name, dev in device_map.items():
        model.get_submodule(name).to(dev)
    mapped = tuple(n + "." for n in device_map)
    for pname, _ in model.named_parameters():
        if not pname.startswith(mapped):
            raise ConfigError(f"device_map leaves parameter {pname} unplaced; map its module too")


def devices_of(device_map: dict[str, str]) -> list[str]:
    return list(dict.fromkeys(device_map.values()))
