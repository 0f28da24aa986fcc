"""AdapterSpec (what registration records) and AdapterLimits (what a server accepts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .kinds import AdapterKind


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64
    max_virtual_tokens: int = 128
    max_prefix_tokens: int = 128
    max_bottleneck: int = 1024  # bottleneck adapters: units of the down projection
    max_file_bytes: int = 256 << 20


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    kind: AdapterKind
    rank: int | None  # LoRA: the largest rank over its modules; None for the other kinds
    targets: tuple[str, ...]  # short module names, e.g. ("q", "v")
    num_virtual_tokens: int | None  # prompt tuning: encoder soft-prompt length
    size_bytes: int  # adapter_model.safetensors on disk
    base_model: str | None  # base_model_name_or_path the adapter was trained for
    path: str
    modules: tuple[str, ...] = ()  # full module paths the adapter changes (validated against the base)
    notes: tuple[str, ...] = ()  # how peftserve serves it where that differs from the file
    base_fingerprint: str | None = None  # BitFit files may record the exact base they were trained on
    options: dict = field(default_factory=dict)  # per-kind facts worth showing (rslora, feedforward targets...)
    # the PEFT method as trained (dora, adalora, p_tuning...) where it differs from the kind it is served as
    method: str | None = None
    # pattern-based fine-tuning: {"pattern", "verbalizer"} from adapter_config.json (adapters/pattern.py); the
    # server fills the pattern with each raw input (serve/app/patterns.py)
    input_pattern: dict | None = None
    # /v1/chat/completions: the Jinja template turning messages into this adapter's input (adapters/chat_template.py)
    chat_template: str | None = None

    @property
    def method_name(self) -> str:
        return self.method or self.kind.value

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["method"] = self.method_name
        d["targets"] = list(self.targets)
        d["notes"] = list(self.notes)
        d["num_modules"] = len(self.modules)
        del d["modules"]  # thousands of paths for XL; num_modules + targets say enough
        return d

    @property
    def dir(self) -> Path:
        return Path(self.path)
