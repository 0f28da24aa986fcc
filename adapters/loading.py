"""inspect_adapter (header only, at registration) and load_adapter (full host load), for every kind."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

from .adapterhub.config import is_adapterhub_config
from .base import BaseDescription
from .chat_template import ChatTemplateError, read_chat_template
from .errors import UnsupportedAdapterError
from .format import AdapterFiles, load_tensors, read_adapter_files
from .kinds import PEFT_TYPES, AdapterKind
from .pattern import PatternError, read_pattern
from .spec import AdapterLimits, AdapterSpec


def _kind_modules() -> dict[AdapterKind, ModuleType]:
    # Each kind module has the same small interface: inspect(files, base, limits, name) -> AdapterSpec,
    # build(spec, files, tensors, base) -> <Kind>Weights.
    from . import bitfit, ia3, lora, prefix, prompt

    return {AdapterKind.LORA: lora, AdapterKind.IA3: ia3, AdapterKind.BITFIT: bitfit, AdapterKind.PROMPT: prompt,
            AdapterKind.PREFIX: prefix}


def _format_module(files: AdapterFiles) -> ModuleType:
    """AdapterHub's layout has its own reader (one file may become LoRA, (IA)3 or the adapterhub kind);
    PEFT's is read per peft_type."""
    if is_adapterhub_config(files.config):
        from .adapterhub import load

        return load
    return _kind_modules()[kind_of(files)]


def kind_of(files: AdapterFiles) -> AdapterKind:
    peft_type = files.config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise UnsupportedAdapterError(
            f"adapter {files.path}: peft_type {peft_type!r} is not served; peftserve serves "
            f"{', '.join(PEFT_TYPES)} and AdapterHub's adapters (check adapter_config.json)")
    return PEFT_TYPES[peft_type]


def _inspect(path, base: BaseDescription, limits: AdapterLimits | None, name: str | None):
    limits = limits or AdapterLimits()
    files = read_adapter_files(path, limits.max_file_bytes)
    module = _format_module(files)
    spec = module.inspect(files, base, limits, name or Path(path).name)
    try:  # every kind may carry the input pattern it was trained under (pattern-based fine-tuning)
        pattern = read_pattern(files.config)
    except PatternError as e:
        raise UnsupportedAdapterError(f"adapter {files.path}: {e}") from None
    if pattern is not None:
        spec = dataclasses.replace(spec, input_pattern=pattern.to_dict())
    try:  # and the chat template its chat requests are rendered with
        template = read_chat_template(files.config)
    except ChatTemplateError as e:
        raise UnsupportedAdapterError(f"adapter {files.path}: {e}") from None
    if template is not None:
        spec = dataclasses.replace(spec, chat_template=template)
    return files, module, spec


def inspect_adapter(path: str | Path, base: BaseDescription, limits: AdapterLimits | None = None,
                    name: str | None = None) -> AdapterSpec:
    """Validate a directory against the base and limits reading only the config and safetensors header."""
    return _inspect(path, base, limits, name)[2]


def load_adapter(path: str | Path, base: BaseDescription, limits: AdapterLimits | None = None,
                 name: str | None = None):
    """Validate, then read the weights into fp32 host tensors: one of `adapters.AdapterWeights`."""
    files, module, spec = _inspect(path, base, limits, name)
    return module.build(spec, files, load_tensors(files), base)
