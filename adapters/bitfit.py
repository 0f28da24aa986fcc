"""BitFit: one trained bias vector per target linear (T5 has no biases; BitFit adds them).

peft has no BitFit tuner, so peftserve defines the format in the same layout (docs/ADAPTERS.md):
adapter_config.json  {"peft_type": "BITFIT", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": ...,
                      "target_modules": ["q", "o", "wo", ...], "layers_to_transform": null | [...],
                      "base_fingerprint": optional}
adapter_model.safetensors  `base_model.model.<full module path>.bias` -> [out_features]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import BaseDescription, is_target_path, short_name
from .common import base_model_of, check_layers, check_target_modules, check_task_type, split_keys, targets_of
from .errors import AdapterError, AdapterMismatchError, UnsupportedAdapterError
from .format import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles
from .kinds import AdapterKind
from .layer import KindSlots
from .spec import AdapterLimits, AdapterSpec


@dataclass
class BitFitWeights:
    spec: AdapterSpec
    biases: dict[str, torch.Tensor]  # module path -> [out]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.biases.values())


def save_bitfit(directory: str | Path, biases: dict[str, torch.Tensor], base_model_name_or_path: str | None = None,
                target_modules: list[str] | None = None, layers_to_transform: list[int] | None = None,
                base_fingerprint: str | None = None) -> Path:
    """Write a BitFit adapter. `biases` maps full module paths (model.named_modules()) to [out] tensors.

    Files are written under temporary names and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    bad = [p for p in biases if not is_target_path(p)]
    if bad:
        raise AdapterError(f"save_bitfit: {bad[0]!r} is not a T5 target linear path "
                           "(like 'encoder.block.0.layer.0.SelfAttention.q')")
    if not biases:
        raise AdapterError("save_bitfit: no biases given")
    flat = [p for p, t in biases.items() if t.dim() != 1]
    if flat:
        raise AdapterError(f"save_bitfit: bias for {flat[0]} must be 1-D [out_features]")
    targets = sorted(target_modules or {short_name(p) for p in biases})
    config = {"peft_type": "BITFIT", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model_name_or_path,
              "target_modules": targets, "layers_to_transform": layers_to_transform,
              "base_fingerprint": base_fingerprint}
    tensors = {f"base_model.model.{p}.bias": t.detach().to("cpu").contiguous() for p, t in biases.items()}
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = directory / f".{WEIGHTS_FILE}.tmp", directory / f".{CONFIG_FILE}.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2))
    os.replace(tmp_w, directory / WEIGHTS_FILE)
    os.replace(tmp_c, directory / CONFIG_FILE)
    return directory


def inspect(files: AdapterFiles, base: BaseDescription, limits: AdapterLimits, name: str) -> AdapterSpec:
    check_task_type(files)
    targets = files.config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise UnsupportedAdapterError(f"adapter {files.path}: a BITFIT config needs target_modules, a list of "
                                      "short module names like [\"q\", \"wo\"] (see docs/ADAPTERS.md)")
    check_target_modules(files, base)
    modules = split_keys(files, ("bias",), base)
    check_layers(files, modules)
    for module, parts in modules.items():
        if short_name(module) not in targets:
            raise AdapterMismatchError(f"adapter {files.path}: bias for {module} but target_modules={targets}; "
                                       "the config does not describe these weights, re-save the adapter")
        out = base.linear_shapes[module][1]
        if tuple(parts["bias"].shape) != (out,):
            raise AdapterMismatchError(
                f"adapter {files.path}: {module}.bias has shape {list(parts['bias'].shape)}, expected [{out}] for "
                f"base {base.name!r}; the adapter was trained for a different model size")
    fp = files.config.get("base_fingerprint")
    return AdapterSpec(
        name=name, kind=AdapterKind.BITFIT, rank=None, targets=targets_of(modules), num_virtual_tokens=None,
        size_bytes=files.size_bytes, base_model=base_model_of(files), path=str(files.path),
        modules=tuple(sorted(modules)), base_fingerprint=fp if isinstance(fp, str) else None)


def build(spec: AdapterSpec, files: AdapterFiles, tensors: dict[str, torch.Tensor], base: BaseDescription | None = None) -> BitFitWeights:
    return BitFitWeights(spec=spec, biases={m: tensors[f"base_model.model.{m}.bias"] for m in spec.modules})


class BitFitSlots(KindSlots):
    """Stacked biases of one layer: [slots+1, out], zeros for slots that do not touch this layer."""

    kind = AdapterKind.BITFIT

    def __init__(self, n: int, fan_out: int, dtype, device) -> None:
        super().__init__()
        self.register_buffer("bias", torch.zeros(n + 1, fan_out, dtype=dtype, device=device), persistent=False)
        self.has = [False] * (n + 1)

    def stage(self, slot: int, weights: BitFitWeights, path: str, dst: list, src: list) -> None:
        if path not in weights.biases:
            return self.clear(slot)
        dst.append(self.bias[slot])
        src.append(weights.biases[path])
        self.has[slot] = True

    def clear(self, slot: int) -> None:
        if self.has[slot]:  # slots a layer does not use are already zero
            self.bias[slot].zero_()
        self.has[slot] = False

    def touches(self, slot: int) -> bool:
        return self.has[slot]

    def gather(self, index_host, index, dtype):
        if not any(self.has[s] for s in index_host):
            return None
        return self.bias.index_select(0, index).to(dtype)

    def post(self, y, x, g):
        return y + g.view(g.shape[0], *([1] * (y.dim() - 2)), g.shape[-1])

    def merge_into(self, slot: int, weight: torch.Tensor):
        return self.bias[slot].clone()
