"""peftserve adapters: LoRA, (IA)3, BitFit and prompt tuning — PEFT-format I/O, validation against the
base, per-row batched math on a wrapped T5, exact merging. Pure torch (no Ray, no HTTP)."""

from .base import BaseDescription
from .bitfit import BitFitWeights, save_bitfit
from .errors import (
    AdapterError,
    AdapterLimitError,
    AdapterMismatchError,
    AdapterNotFoundError,
    CorruptAdapterError,
    SlotError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)
from .ia3 import IA3Weights
from .kinds import AdapterKind
from .layer import AdaptedLinear
from .loading import inspect_adapter, load_adapter
from .lora import LoraWeights
from .prefix import PrefixWeights
from .prompt import PromptWeights
from .rows import RowAdapters
from .slots import AdapterSlots, SlotConfig, attach_slots, encoder_embedding
from .spec import AdapterLimits, AdapterSpec

AdapterWeights = LoraWeights | IA3Weights | BitFitWeights | PromptWeights | PrefixWeights

__all__ = [
    "AdaptedLinear", "AdapterError", "AdapterKind", "AdapterLimitError", "AdapterLimits", "AdapterMismatchError",
    "AdapterNotFoundError", "AdapterSlots", "AdapterSpec", "AdapterWeights", "BaseDescription", "BitFitWeights",
    "CorruptAdapterError", "IA3Weights", "LoraWeights", "PrefixWeights", "PromptWeights", "RowAdapters", "SlotConfig", "SlotError",
    "UnsafeAdapterFormatError", "UnsupportedAdapterError", "attach_slots", "encoder_embedding", "inspect_adapter", "load_adapter",
    "save_bitfit",
]
