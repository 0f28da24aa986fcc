"""(IA)3: learned scale vectors. PEFT format: `base_model.model.<module>.ia3_l`, shaped [1, in] for modules
matched by `feedforward_modules` (the input is scaled) and [out, 1] for the others (the output is scaled).

Merging multiplies weight columns (feed-forward) or rows (others) by the vector; unmerge copies back the
exact original weight saved at merge time, so the base is bit-identical afterwards (peft divides, which drifts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
from .errors import AdapterMismatchError, UnsupportedAdapterError
from .format import AdapterFiles
from .kinds import AdapterKind
from .layer import KindSlots
from .spec import AdapterLimits, AdapterSpec

UNSUPPORTED = {"modules_to_save": "full copies of extra modules",
               "fan_in_fan_out": "Conv1D-style transposed weights (T5 uses nn.Linear)"}


@dataclass
class IA3Weights:
    spec: AdapterSpec
    vectors: dict[str, torch.Tensor]  # module path -> [in] if feedforward else [out]
    feedforward: dict[str, bool]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.vectors.values())


def is_feedforward(config: dict, module: str) -> bool:
    """peft's rule: a regex string must fullmatch the path; list entries match as a plain path suffix."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(t) for t in ff)


def inspect(files: AdapterFiles, base: BaseDescription, limits: AdapterLimits, name: str) -> AdapterSpec:
    check_task_type(files)
    refuse_options(files, UNSUPPORTED)
    ff = files.config.get("feedforward_modules")
    if ff is not None and not isinstance(ff, str | list):
        raise UnsupportedAdapterError(f"adapter {files.path}: feedforward_modules must be a list of names or a regex")
    check_target_modules(files, base)
    modules = split_keys(files, ("ia3_l",), base)
    check_layers(files, modules)
    ff_modules = []
    for module, parts in modules.items():
        shape = parts["ia3_l"].shape
        fan_in, fan_out = base.linear_shapes[module]
        feedforward = is_feedforward(files.config, module)
        expected = (1, fan_in) if feedforward else (fan_out, 1)
        if tuple(shape) != expected:
            raise AdapterMismatchError(
                f"adapter {files.path}: {module}.ia3_l has shape {list(shape)}, expected {list(expected)} for a "
                f"{'feed-forward' if feedforward else 'non-feed-forward'} {fan_in}->{fan_out} layer of base "
                f"{base.name!r}; the adapter was trained for another model or its feedforward_modules changed")
        if feedforward:
            ff_modules.append(module)
    return AdapterSpec(
        name=name, kind=AdapterKind.IA3, rank=None, targets=targets_of(modules), num_virtual_tokens=None,
        size_bytes=files.size_bytes, base_model=base_model_of(files), path=str(files.path),
        modules=tuple(sorted(modules)), options={"feedforward_targets": list(targets_of(ff_modules))})


def build(spec: AdapterSpec, files: AdapterFiles, tensors: dict[str, torch.Tensor], base: BaseDescription | None = None) -> IA3Weights:
    vectors, feedforward = {}, {}
    for module in spec.modules:
        vectors[module] = tensors[f"base_model.model.{module}.ia3_l"].flatten().contiguous()
        feedforward[module] = is_feedforward(files.config, module)
    return IA3Weights(spec=spec, vectors=vectors, feedforward=feedforward)


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


class IA3Slots(KindSlots):
    """Stacked scale vectors of one layer: input side [slots+1, in], output side [slots+1, out], all ones
    where a slot does not scale that side (so identity rows need no mask)."""

    kind = AdapterKind.IA3

    def __init__(self, n: int, fan_in: int, fan_out: int, dtype, device) -> None:
        super().__init__()
        self.register_buffer("scale_in", torch.ones(n + 1, fan_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale_out", torch.ones(n + 1, fan_out, dtype=dtype, device=device), persistent=False)
        self.has_in = [False] * (n + 1)
        self.has_out = [False] * (n + 1)

    def stage(self, slot: int, weights: IA3Weights, path: str, dst: list, src: list) -> None:
        self.clear(slot)
        if path not in weights.vectors:
            return
        if weights.feedforward[path]:
            dst.append(self.scale_in[slot])
            self.has_in[slot] = True
        else:
            dst.append(self.scale_out[slot])
            self.has_out[slot] = True
        src.append(weights.vectors[path])

    def clear(self, slot: int) -> None:
        # Sides a slot does not scale are already ones (the identity): refill only what it used.
        if self.has_in[slot]:
            self.scale_in[slot].fill_(1.0)
        if self.has_out[slot]:
            self.scale_out[slot].fill_(1.0)
        self.has_in[slot] = self.has_out[slot] = False

    def touches(self, slot: int) -> bool:
        return self.has_in[slot] or self.has_out[slot]

    def gather(self, index_host, index, dtype):
        g_in = self.scale_in.index_select(0, index).to(dtype) if any(self.has_in[s] for s in index_host) else None
        g_out = self.scale_out.index_select(0, index).to(dtype) if any(self.has_out[s] for s in index_host) else None
        return None if g_in is None and g_out is None else (g_in, g_out)

    def pre(self, x, g):
        return x if g[0] is None else x * _per_row(g[0], x)

    def post(self, y, x, g):
        # y is the wrapped layer's fresh output (nobody else holds it): scale in place, no new tensor
        return y if g[1] is None else y.mul_(_per_row(g[1], y))

    def merge_into(self, slot: int, weight: torch.Tensor):
        if self.has_in[slot]:
            weight.mul_(self.scale_in[slot].to(weight.dtype)[None, :])
        if self.has_out[slot]:
            weight.mul_(self.scale_out[slot].to(weight.dtype)[:, None])
        return None
