"""LoRA, and the two PEFT methods that fold into it: PEFT format in, one narrow dataclass out, batched
per-row math and merge delta.

LoRA (PeftModel.save_pretrained, T5, SEQ_2_SEQ_LM): `base_model.model.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]. Per module r comes from the tensors (rank_pattern already shaped them);
alpha from `alpha_pattern` (peft's pattern-key rule) else `lora_alpha`; scaling alpha/r, or alpha/sqrt(r)
with `use_rslora`. Scaling is folded into B at load so the hot path is two matmuls.

DoRA (LORA with `use_dora`): also `.lora_magnitude_vector` [out]. peft computes
y = (m / ||W + s·B·A||_row) ⊙ (W x + s·B·A x); the norm needs the base weight, so the per-output scale
g = m / ||W + s·B·A|| is computed when the adapter is written to a slot (`LoraSlots.stage`, on the
layer's device, from the unmerged weight) and applied per row after the LoRA term.

AdaLoRA (ADALORA): `.lora_A` [r, in], `.lora_E` [r, 1], `.lora_B` [out, r] (no `.weight`), r the rank
left after pruning (the file is already cut to `rank_pattern`). peft computes B (A ⊙ E) x · alpha / (ranknum
+ 1e-5) with ranknum the *initial* rank `init_r` (resizing keeps it) and alpha = lora_alpha (init_r when
<= 0). At load E is folded into A and the scale into B: plain LoRA from then on.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .base import BaseDescription
from .common import (
    base_model_of,
    check_layers,
    check_target_modules,
    check_task_type,
    refuse_options,
    split_keys,
    targets_of,
)
from .errors import AdapterLimitError, AdapterMismatchError, SlotError, UnsupportedAdapterError
from .format import AdapterFiles
from .kinds import AdapterKind
from .layer import KindSlots
from .spec import AdapterLimits, AdapterSpec

SUFFIXES = ("lora_A.weight", "lora_B.weight")
MAGNITUDE = "lora_magnitude_vector"
ADALORA_SUFFIXES = ("lora_A", "lora_B", "lora_E")
# Options whose effect the plain x @ A @ B math does not reproduce.
UNSUPPORTED = {
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "full copies of extra modules",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "parameters instead of modules",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "quantization-aware LoRA",
    "fan_in_fan_out": "Conv1D-style transposed weights (T5 uses nn.Linear)",
    "megatron_config": "megatron parallel layers",
}
# These inits rewrite the base weights too; a saved adapter is only valid on that rewritten base
# unless it was converted at save time (path_initial_model_for_weight_conversion).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")


@dataclass
class LoraWeights:
    spec: AdapterSpec
    a: dict[str, torch.Tensor]  # module path -> [r, in]
    b: dict[str, torch.Tensor]  # module path -> [out, r], scaling folded in
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: module path -> m [out]
    # module path -> the scaling folded into b (b / scaling is the file's lora_B): what ties/dare merge
    scaling: dict[str, float] = field(default_factory=dict)
    # module path -> (A.T [in, r], B.T [r, out]) contiguous: the slot layout, what a swap copies. Made once
    # here; free when a/b are transposed views of contiguous tensors, as `build` makes them.
    slot_layout: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.slot_layout = {m: (a.T.contiguous(), self.b[m].T.contiguous()) for m, a in self.a.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values(),
                                                           *self.magnitude.values()))


def pattern_key(patterns, module: str) -> str | None:
    """peft's get_pattern_key: the first pattern that matches the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def scaling_for(config: dict, module: str, rank: int) -> float:
    alphas = config.get("alpha_pattern") or {}
    key = pattern_key(alphas, module)
    alpha = float(alphas[key] if key is not None else config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def method_of(files: AdapterFiles) -> str:
    if files.config.get("peft_type") == "ADALORA":
        return "adalora"
    return "dora" if files.config.get("use_dora") else "lora"


def adalora_rank_scale(files: AdapterFiles) -> float:
    """alpha / (ranknum + 1e-5) as peft's AdaLoRA forward applies it (ranknum = init_r, kept by pruning)."""
    init_r = files.config.get("init_r")
    if not isinstance(init_r, int) or init_r <= 0:
        raise AdapterMismatchError(f"adapter {files.path}: an AdaLoRA config needs its rank data: init_r (the "
                                   f"rank before pruning, which scales the update) is {init_r!r}; re-save the "
                                   "adapter with PeftModel.save_pretrained")
    alpha = files.config.get("lora_alpha", 8)
    alpha = float(alpha if isinstance(alpha, int | float) and alpha > 0 else init_r)
    return alpha / (init_r + 1e-5)


def _check_adalora(files: AdapterFiles, modules: dict) -> dict:
    """Every module has A, E and B of one rank, which matches rank_pattern when the file was pruned. Modules
    pruned to rank 0 change nothing and are dropped."""
    adalora_rank_scale(files)
    pattern = files.config.get("rank_pattern")
    if pattern is not None and not isinstance(pattern, dict):
        raise AdapterMismatchError(f"adapter {files.path}: rank_pattern must map modules to kept-rank masks")
    kept = {}
    for module, parts in modules.items():
        if set(parts) != set(ADALORA_SUFFIXES):
            missing = sorted(set(ADALORA_SUFFIXES) - set(parts))
            raise AdapterMismatchError(f"adapter {files.path}: AdaLoRA module {module} lacks {', '.join(missing)} "
                                       "(A, E and B are its SVD triplet); re-save the adapter")
        a, e, b = parts["lora_A"].shape, parts["lora_E"].shape, parts["lora_B"].shape
        if len(a) != 2 or len(b) != 2 or tuple(e) != (a[0], 1) or b[1] != a[0]:
            raise AdapterMismatchError(f"adapter {files.path}: AdaLoRA module {module} has lora_A {list(a)}, "
                                       f"lora_E {list(e)}, lora_B {list(b)}; expected [r, in], [r, 1], [out, r]")
        if pattern is not None:
            mask = pattern.get(f"{module}.lora_E", pattern.get(module))
            if mask is not None and (not isinstance(mask, list) or sum(bool(x) for x in mask) != a[0]):
                raise AdapterMismatchError(
                    f"adapter {files.path}: rank_pattern keeps {sum(bool(x) for x in mask) if isinstance(mask, list) else mask!r} "
                    f"ranks of {module} but its tensors have rank {a[0]}; the config and weights disagree, re-save")
        if a[0] > 0:
            kept[module] = {"lora_A.weight": parts["lora_A"], "lora_B.weight": parts["lora_B"]}
    if not kept:
        raise AdapterMismatchError(f"adapter {files.path}: every AdaLoRA module was pruned to rank 0; the "
                                   "adapter changes nothing")
    return kept


def inspect(files: AdapterFiles, base: BaseDescription, limits: AdapterLimits, name: str) -> AdapterSpec:
    check_task_type(files)
    refuse_options(files, UNSUPPORTED)
    method = method_of(files)
    if files.config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"adapter {files.path}: LoRA bias={files.config['bias']!r} trains the base "
                                      "biases too; peftserve serves bias='none' (serve biases as a BitFit adapter)")
    init = files.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"adapter {files.path}: init_lora_weights={init!r} also rewrites the base weights; save it with "
            "path_initial_model_for_weight_conversion so it applies to the original base")
    check_target_modules(files, base)
    if method == "adalora":
        modules = _check_adalora(files, split_keys(files, ADALORA_SUFFIXES, base))
    else:
        modules = split_keys(files, SUFFIXES + ((MAGNITUDE,) if method == "dora" else ()), base)
    check_layers(files, modules)
    rank = 0
    for module, parts in modules.items():
        magnitude = parts.pop(MAGNITUDE, None)
        if set(parts) != set(SUFFIXES):
            raise AdapterMismatchError(f"adapter {files.path}: module {module} has only {', '.join(parts)}; "
                                       "lora_A and lora_B come in pairs, re-save the adapter")
        a, b = parts["lora_A.weight"].shape, parts["lora_B.weight"].shape
        fan_in, fan_out = base.linear_shapes[module]
        if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b[0] != fan_out or a[0] != b[1] or a[0] == 0:
            raise AdapterMismatchError(
                f"adapter {files.path}: {module} has lora_A {list(a)} and lora_B {list(b)} but the base layer is "
                f"{fan_in}->{fan_out} (expected [r, {fan_in}] and [{fan_out}, r]); the adapter was trained for "
                f"a different model size than base {base.name!r}")
        if method == "dora" and (magnitude is None or tuple(magnitude.shape) != (fan_out,)):
            raise AdapterMismatchError(
                f"adapter {files.path}: DoRA module {module} needs {MAGNITUDE} of shape [{fan_out}] (found "
                f"{'none' if magnitude is None else list(magnitude.shape)}); re-save it with PeftModel.save_pretrained")
        rank = max(rank, a[0])
    if rank > limits.max_rank:
        raise AdapterLimitError(f"adapter {files.path}: LoRA rank {rank} is above this server's max_rank="
                                f"{limits.max_rank}; retrain with a smaller r or raise the limit")
    options = {"use_rslora": bool(files.config.get("use_rslora")),
               "lora_alpha": files.config.get("lora_alpha"),
               "rank_pattern": bool(files.config.get("rank_pattern")),
               "alpha_pattern": bool(files.config.get("alpha_pattern"))}
    notes: tuple[str, ...] = ()
    if method == "adalora":
        options = {"init_r": files.config.get("init_r"), "lora_alpha": files.config.get("lora_alpha"),
                   "pruned": bool(files.config.get("rank_pattern"))}
        notes = ("AdaLoRA's SVD triplet is folded into plain LoRA A/B at load (E into A, alpha/init_r into B)",)
    elif method == "dora":
        options["use_dora"] = True
        notes = ("DoRA: per-row output scale m / ||W + s·B·A|| computed from the base weight when the slot is written",)
    return AdapterSpec(
        name=name, kind=AdapterKind.LORA, rank=rank, targets=targets_of(modules), num_virtual_tokens=None,
        size_bytes=files.size_bytes, base_model=base_model_of(files), path=str(files.path),
        modules=tuple(sorted(modules)), options=options, notes=notes,
        method=None if method == "lora" else method,
    )


def build(spec: AdapterSpec, files: AdapterFiles, tensors: dict[str, torch.Tensor], base: BaseDescription | None = None) -> LoraWeights:
    """A and B are stored transposed in memory (A.T [in, r], B.T [r, out] contiguous; `a`/`b` are their
    [r, in] / [out, r] views): that is the slot layout, so the transposing copy happens here, on the
    loader thread, and the swap (`LoraSlots.stage`) is a plain contiguous copy."""
    a, b, magnitude, scaling = {}, {}, {}, {}
    adalora = spec.method == "adalora"
    for module in spec.modules:
        key = f"base_model.model.{module}"
        if adalora:  # B (A ⊙ E) · alpha/(init_r + 1e-5): E into A, the scale into B
            a_raw = tensors[f"{key}.lora_A"] * tensors[f"{key}.lora_E"]
            b_raw, scale = tensors[f"{key}.lora_B"], adalora_rank_scale(files)
        else:
            a_raw, b_raw = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            scale = scaling_for(files.config, module, a_raw.shape[0])
        a_t = a_raw.t().contiguous()
        b_t = torch.empty(b_raw.shape[1], b_raw.shape[0], dtype=b_raw.dtype)  # scale and transpose in one pass
        torch.mul(b_raw.t(), scale, out=b_t)
        a[module], b[module], scaling[module] = a_t.t(), b_t.t(), scale
        if spec.method == "dora":
            magnitude[module] = tensors[f"{key}.{MAGNITUDE}"].contiguous()
    return LoraWeights(spec=spec, a=a, b=b, magnitude=magnitude, scaling=scaling)


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor,
               weight_sq_norm: torch.Tensor) -> torch.Tensor:
    """g = m / ||W + B A|| per output row (B carries the scaling), in fp32, without forming W + B A:
    ||W_o + (BA)_o||^2 = ||W_o||^2 + 2 B_o·(W A^T)_o + B_o (A A^T) B_o^T, at the cost of the LoRA term."""
    a32, b32, w32 = a.float(), b.float(), weight.float()
    cross = ((w32 @ a32.T) * b32).sum(dim=1)  # [out]
    lora_sq = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)
    norm = (weight_sq_norm + 2 * cross + lora_sq).clamp_min(0).sqrt()
    return magnitude.float().to(norm.device) / norm


# ---- batched math (tensors already gathered per row) ---------------------------------------------

def apply(y: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """y + x @ A_row @ B_row for every row. x [B, T, in], a_rows [B, in, r], b_rows [B, r, out]."""
    return torch.baddbmm(y, torch.bmm(x, a_rows), b_rows)


def apply_(y: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """`apply` accumulated into y in place (y must be a fresh tensor nobody else reads): no new output."""
    return y.baddbmm_(torch.bmm(x, a_rows), b_rows)


def delta_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A as a [out, in] weight update (scaling already in B); computed in fp32."""
    return b.float() @ a.float()


def _regather_changed(last, key, index_host, generations, index, a, b, dtype):
    """Continuous batching changes a few rows at a time (a row leaves and the last row moves into its place,
    a row joins at the end): reuse the previous gathered A/B buffers and copy in only the rows whose slot,
    or whose slot's contents, changed. None when not worth it: dtype, rank or storage changed, more rows
    than the buffers hold, or most rows changed."""
    if last is None or last[0] != key:
        return None
    _, old, old_gen, a_buf, b_buf = last
    if len(index_host) > a_buf.shape[0]:
        return None
    changed = [i for i, s in enumerate(index_host)
               if i >= len(old) or s != old[i] or generations[s] != old_gen[i]]
    if 2 * len(changed) > len(index_host):
        return None
    if changed:  # the old cache is being replaced: updating its buffers in place is safe
        pos = torch.tensor(changed, dtype=torch.long, device=index.device)
        src = index.index_select(0, pos)
        a_buf.index_copy_(0, pos, a.index_select(0, src).to(dtype))
        b_buf.index_copy_(0, pos, b.index_select(0, src).to(dtype))
    return a_buf, b_buf


class PerRow(NamedTuple):
    """Each computed row with its own gathered A/B: `rows` None = every row of the batch, in order."""
    rows: torch.Tensor | None
    a: torch.Tensor  # [rows, in, r]
    b: torch.Tensor  # [rows, r, out]


class Grouped(NamedTuple):
    """Rows sharing an adapter packed as [groups, size] places: one GEMM per group instead of one per row,
    so each adapter's A/B is read once per step, not once per row (S-LoRA/Punica's point, as batched GEMMs)."""
    places: torch.Tensor | None  # [groups * size] the row at each place (padding repeats a real row);
    # None: place i is row i (rows already in group order, no padding): no gather, no scatter
    pad: torch.Tensor | None  # [groups, size, 1, 1]: 0 at padding places (their delta is zeroed), else None
    size: int
    a: torch.Tensor  # [groups, in, r]
    b: torch.Tensor  # [groups, r, out]


@functools.lru_cache(maxsize=256)
def group_rows(slot_of_row: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...], int] | None:
    """Pack rows by adapter slot: (slot per group, row per place, real per place, places per group), or
    None when the rows are mostly distinct adapters (the per-row path then reads no more bytes).

    Groups hold at most the mean rows-per-adapter (rounded): a popular adapter is split over several groups
    rather than padding every other group to its size. Pure and cached: every layer of one batch asks the
    same question."""
    n = len(slot_of_row)
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slot_of_row):
        by_slot.setdefault(slot, []).append(row)
    size = max(1, round(n / len(by_slot)))
    groups = [(slot, rows[k:k + size]) for slot, rows in by_slot.items() for k in range(0, len(rows), size)]
    if 2 * len(groups) > n:
        return None
    slots = tuple(slot for slot, _ in groups)
    places = tuple(rows[k] if k < len(rows) else rows[0] for _, rows in groups for k in range(size))
    real = tuple(k < len(rows) for _, rows in groups for k in range(size))
    return slots, places, real, size


class Rescaled(NamedTuple):
    """A LoRA gather plus DoRA's per-row output scale [rows, out] (1 for rows without DoRA on this layer)."""
    inner: PerRow | Grouped
    scale: torch.Tensor


class LoraSlots(KindSlots):
    """Stacked LoRA weights of one layer: A as [slots+1, in, max_rank], B as [slots+1, max_rank, out]
    (pre-transposed for x @ A @ B). Ranks below max_rank are zero-padded; a batch only computes up to the
    largest rank among its rows."""

    kind = AdapterKind.LORA

    def __init__(self, n: int, fan_in: int, fan_out: int, max_rank: int, dtype, device) -> None:
        super().__init__()
        self.register_buffer("a", torch.zeros(n + 1, fan_in, max_rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("b", torch.zeros(n + 1, max_rank, fan_out, dtype=dtype, device=device), persistent=False)
        self.rank = [0] * (n + 1)  # host-side: this layer's rank per slot (0 = slot does not touch it)
        # Host-side, per slot: bumped by every stage/clear (rows gathered from an older generation are stale).
        # Plain lists, not module attributes: a swap updates ~150 layers and nn.Module.__setattr__ is slow.
        self.generation = [0] * (n + 1)
        # DoRA: per-slot output scale m / ||W + s·B·A|| (ones where a slot has no DoRA on this layer)
        self.register_buffer("scale", torch.ones(n + 1, fan_out, dtype=dtype, device=device), persistent=False)
        self.dora = [False] * (n + 1)
        self._unmerged_weight = None  # set by AdaptedLinear: the base weight as if nothing were merged
        self._weight_sq_norm: torch.Tensor | None = None  # ||W_o||^2 per output row, made at the first DoRA write
        self._views = self._slot_views()
        self._last = None  # (key, index_host, generations, A rows buffer, B rows buffer) of the last gather

    def bind_layer(self, unmerged_weight) -> None:
        """`unmerged_weight()` returns this layer's base weight without any merged adapter (DoRA's norm)."""
        self._unmerged_weight = unmerged_weight

    def _slot_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-slot (A, B) views, made once: indexing the buffers on every swap costs ~150 layers x 2."""
        return [(self.a[s], self.b[s]) for s in range(self.a.shape[0])]

    def _apply(self, fn, recurse=True):
        # .to() / .double() / .cuda() replace the buffers: views of the old storage must not be written
        out = super()._apply(fn, recurse)
        self._views = self._slot_views()
        return out

    # Invariant: a[slot, :, rank:] and b[slot, rank:, :] are zero, so a write only copies the adapter's
    # own [:r] block and zeroes the tail only when the previous occupant had a larger rank on this layer.
    def stage(self, slot: int, weights: LoraWeights, path: str, dst: list, src: list) -> None:
        pair = weights.slot_layout.get(path)
        if pair is None:
            return self.clear(slot)
        a_t, b_t = pair
        r = a_t.shape[1]
        self.generation[slot] += 1
        slot_a, slot_b = self._views[slot]
        if self.rank[slot] > r:
            slot_a[:, r:].zero_()
            slot_b[r:].zero_()
        if r < slot_b.shape[0]:
            slot_a, slot_b = slot_a[:, :r], slot_b[:r]
        dst += (slot_a, slot_b)
        src += pair
        self.rank[slot] = r
        magnitude = weights.magnitude.get(path)
        if magnitude is not None:
            self._write_dora_scale(slot, weights.a[path], weights.b[path], magnitude)
        elif self.dora[slot]:
            self.scale[slot].fill_(1.0)
            self.dora[slot] = False

    def _write_dora_scale(self, slot: int, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> None:
        if self._unmerged_weight is None:
            raise SlotError("DoRA needs the base weight: this LoraSlots is not bound to its layer")
        weight = self._unmerged_weight()
        dev = weight.device
        if self._weight_sq_norm is None or self._weight_sq_norm.device != dev:
            self._weight_sq_norm = weight.float().pow(2).sum(dim=1)
        g = dora_scale(weight, a.to(dev), b.to(dev), magnitude.to(dev), self._weight_sq_norm)
        self.scale[slot].copy_(g.to(self.scale.dtype))
        self.dora[slot] = True

    def clear(self, slot: int) -> None:
        self.generation[slot] += 1
        if self.rank[slot]:
            self.a[slot].zero_()
            self.b[slot].zero_()
        self.rank[slot] = 0
        if self.dora[slot]:
            self.scale[slot].fill_(1.0)
            self.dora[slot] = False

    def touches(self, slot: int) -> bool:
        return self.rank[slot] > 0

    def gather(self, index_host, index, dtype):
        """Per-row A/B for this batch: `Grouped` when rows share adapters, else `PerRow`; wrapped in
        `Rescaled` when a row uses DoRA here. Rows without LoRA on this layer (base rows, other kinds, layers
        outside layers_to_transform) are not computed."""
        g = self._gather_ab(index_host, index, dtype)
        if g is None or not any(self.dora[s] for s in index_host):
            return g
        return Rescaled(g, self.scale.index_select(0, index).to(dtype))

    def _gather_ab(self, index_host, index, dtype):
        active = [i for i, s in enumerate(index_host) if self.rank[s] > 0]
        self._last, last = None, self._last
        if not active:
            return None
        r = max(self.rank[index_host[i]] for i in active)
        a, b = self.a[:, :, :r], self.b[:, :r, :]
        plan = group_rows(tuple(index_host[i] for i in active))
        if plan is not None:
            slots, places, real, size = plan
            dev = index.device
            sel = torch.tensor(slots, dtype=torch.long, device=dev)
            pad = None if all(real) else torch.tensor(real, dtype=dtype, device=dev).view(len(slots), size, 1, 1)
            rows = [active[p] for p in places]
            in_order = pad is None and rows == list(range(len(index_host)))
            return Grouped(None if in_order else torch.tensor(rows, dtype=torch.long, device=dev), pad, size,
                           a.index_select(0, sel).to(dtype), b.index_select(0, sel).to(dtype))
        if len(active) < len(index_host):
            rows = torch.tensor(active, dtype=torch.long, device=index.device)
            index = index.index_select(0, rows)
            return PerRow(rows, a.index_select(0, index).to(dtype), b.index_select(0, index).to(dtype))
        key = (dtype, r, self.a.data_ptr())
        gen = self.generation
        reused = _regather_changed(last, key, index_host, gen, index, a, b, dtype)
        a_buf, b_buf = reused or (a.index_select(0, index).to(dtype), b.index_select(0, index).to(dtype))
        # buffers may hold more rows than this batch
        self._last = (key, index_host, tuple(gen[s] for s in index_host), a_buf, b_buf)
        n = len(index_host)
        return PerRow(None, a_buf[:n], b_buf[:n])

    def gather_terms(self, terms, device, dtype):
        """Per-row A/B for rows that sum weighted LoRAs (`RowAdapters.lora_terms`: per row (slot index,
        weight) pairs). A row's terms are concatenated along the rank, A = [A₁ … A_k], B = [w₁B₁; … w_kB_k],
        so y + x A B = y + Σ wᵢ x Aᵢ Bᵢ in one pair of batched matmuls: PEFT's `cat` combination, per row.
        Rows with the same terms share one group (`group_rows`), as rows of one adapter do."""
        live = [tuple((s, w) for s, w in row if self.rank[s] > 0) for row in terms]
        active = [i for i, row in enumerate(live) if row]
        if not active:
            return None
        dora = {i for i in active if any(self.dora[s] for s, _ in live[i])}
        for i in dora:
            if len(live[i]) > 1 or live[i][0][1] != 1.0:
                raise SlotError("a DoRA adapter cannot be summed with other LoRAs or weighted on one row: its "
                                "magnitude rescales the whole layer output")
        r = max(self.rank[s] for i in active for s, _ in live[i])
        keys = [live[i] for i in active]
        plan = group_rows(tuple(keys))
        if plan is not None:
            group_keys, places, real, size = plan
            a, b = self._concat(group_keys, r, device, dtype)
            pad = None if all(real) else torch.tensor(real, dtype=dtype, device=device).view(len(group_keys), size, 1, 1)
            rows = [active[p] for p in places]
            in_order = pad is None and rows == list(range(len(terms)))
            g = Grouped(None if in_order else torch.tensor(rows, dtype=torch.long, device=device), pad, size, a, b)
        else:
            a, b = self._concat(keys, r, device, dtype)
            every = len(active) == len(terms)
            g = PerRow(None if every else torch.tensor(active, dtype=torch.long, device=device), a, b)
        if not dora:
            return g
        index = torch.tensor([live[i][0][0] if i in dora else 0 for i in range(len(terms))], device=device)
        return Rescaled(g, self.scale.index_select(0, index).to(dtype))

    def _concat(self, keys, r: int, device, dtype):
        """For each key (a tuple of (slot index, weight)), A [in, k·r] and weighted B [k·r, out]; shorter keys
        are padded with the identity slot (zeros) at weight 0."""
        k = max(len(key) for key in keys)
        slots = torch.tensor([[s for s, _ in key] + [0] * (k - len(key)) for key in keys], device=device)
        weights = torch.tensor([[w for _, w in key] + [0.0] * (k - len(key)) for key in keys], dtype=dtype,
                               device=device)
        n, fan_in, fan_out = len(keys), self.a.shape[1], self.b.shape[2]
        a = self.a[:, :, :r].index_select(0, slots.flatten()).to(dtype).view(n, k, fan_in, r)
        b = self.b[:, :r, :].index_select(0, slots.flatten()).to(dtype).view(n, k, r, fan_out)
        a = a.permute(0, 2, 1, 3).reshape(n, fan_in, k * r)
        b = (b * weights.view(n, k, 1, 1)).reshape(n, k * r, fan_out)
        return a, b

    def drop_cache(self) -> None:
        self._last = None

    def post(self, y, x, g):
        if isinstance(g, Rescaled):  # DoRA: g ⊙ (W x + s·B·A x), per row
            y = self.post(y, x, g.inner)
            return y.view(y.shape[0], -1, y.shape[-1]).mul_(g.scale[:, None, :]).view(y.shape)
        shape = y.shape
        y3, x3 = y.reshape(shape[0], -1, shape[-1]), x.reshape(shape[0], -1, x.shape[-1])
        # y is this layer's fresh output: every path accumulates into it in place
        if isinstance(g, Grouped):
            groups, t = g.a.shape[0], x3.shape[1]
            if g.places is None:  # e.g. one adapter for the whole batch: plain GEMMs on the batch as it is
                h = torch.bmm(x3.reshape(groups, g.size * t, -1), g.a)
                return y3.view(groups, g.size * t, -1).baddbmm_(h, g.b).reshape(shape)
            h = torch.bmm(x3.index_select(0, g.places).view(groups, g.size * t, -1), g.a)
            if g.pad is not None:
                h.view(groups, g.size, t, -1).mul_(g.pad)
            delta = torch.bmm(h, g.b).view(groups * g.size, t, -1)
            return y3.index_add_(0, g.places, delta).reshape(shape)
        if g.rows is None:
            return apply_(y3, x3, g.a, g.b).reshape(shape)
        delta = torch.bmm(torch.bmm(x3.index_select(0, g.rows), g.a), g.b)
        return y3.index_add_(0, g.rows, delta).reshape(shape)

    def merge_into(self, slot: int, weight: torch.Tensor):
        r = self.rank[slot]
        delta = delta_weight(self.a[slot, :, :r].T, self.b[slot, :r, :].T)
        merged = weight.float() + delta.to(weight.device)
        if self.dora[slot]:  # W' = g ⊙ (W + s·B·A), row by row
            merged.mul_(self.scale[slot].float().to(weight.device)[:, None])
        weight.copy_(merged.to(weight.dtype))
        return None
