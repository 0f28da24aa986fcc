"""BaseDescription: what adapters are validated against (shapes only; no weights)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .kinds import T5_TARGETS

_LAYER_INDEX = re.compile(r"\.block\.(\d+)\.")


@dataclass(frozen=True)
class BaseDescription:
    name: str
    fingerprint: str
    d_model: int
    # full module path as in model.named_modules() -> (in_features, out_features), T5 targets only
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # attention geometry (prefix tuning's key/values must fit it)
    num_heads: int = 0
    d_kv: int = 0
    num_layers: int = 0
    num_decoder_layers: int = 0

    @classmethod
    def from_model(cls, model, name: str, fingerprint: str) -> BaseDescription:
        import torch

        shapes = {
            path: (m.in_features, m.out_features)
            for path, m in model.named_modules()
            if is_target_path(path) and isinstance(getattr(m, "base_layer", m), torch.nn.Linear)
        }
        # An already-wrapped model (AdaptedLinear) describes the same shapes as the bare one.
        cfg = model.config
        return cls(name=name, fingerprint=fingerprint, d_model=int(cfg.d_model), linear_shapes=shapes,
                   num_heads=int(cfg.num_heads), d_kv=int(cfg.d_kv), num_layers=int(cfg.num_layers),
                   num_decoder_layers=int(getattr(cfg, "num_decoder_layers", None) or cfg.num_layers))

    def short_names(self) -> list[str]:
        return sorted({short_name(p) for p in self.linear_shapes})


def short_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int | None:
    m = _LAYER_INDEX.search(path)
    return int(m.group(1)) if m else None


def is_target_path(path: str) -> bool:
    return path.startswith(("encoder.block.", "decoder.block.")) and short_name(path) in T5_TARGETS
