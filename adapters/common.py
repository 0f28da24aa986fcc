"""Checks shared by every kind: config fields, tensor keys, target names against the base."""

from __future__ import annotations

import re

from .base import BaseDescription, layer_index, short_name
from .errors import AdapterMismatchError, UnsupportedAdapterError
from .format import AdapterFiles, TensorInfo

PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module path


def split_keys(files: AdapterFiles, suffixes: tuple[str, ...], base: BaseDescription) -> dict[str, dict[str, TensorInfo]]:
    """module path -> {suffix: TensorInfo}; every key must be PREFIX + a base target module + a known suffix."""
    out: dict[str, dict[str, TensorInfo]] = {}
    for key, info in files.tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise UnsupportedAdapterError(
                f"adapter {files.path}: unexpected tensor {key!r}; expected keys like "
                f"'{PREFIX}encoder.block.0.layer.0.SelfAttention.q.{suffixes[0]}' as PeftModel.save_pretrained "
                "writes them (modules_to_save, embeddings and other extras are not served)")
        module = key[len(PREFIX): -len(suffix) - 1]
        if module not in base.linear_shapes:
            raise AdapterMismatchError(
                f"adapter {files.path}: module {module!r} is not a target linear of base {base.name!r} "
                f"(it has {', '.join(base.short_names())} in encoder/decoder blocks 0..); "
                "the adapter was trained for another model — use the base it was trained on")
        out.setdefault(module, {})[suffix] = info
    if not out:
        raise UnsupportedAdapterError(f"adapter {files.path}: {files.weights.name} holds no adapter tensors")
    return out


def check_task_type(files: AdapterFiles, required: bool = False) -> None:
    task = files.config.get("task_type")
    if task == "SEQ_2_SEQ_LM" or (task is None and not required):
        return
    raise UnsupportedAdapterError(
        f"adapter {files.path}: task_type {task!r} is not served; peftserve serves encoder-decoder "
        "(T5) adapters saved with task_type='SEQ_2_SEQ_LM'")


def refuse_options(files: AdapterFiles, options: dict[str, str]) -> None:
    """Refuse config options whose meaning peftserve does not implement (truthy value = used)."""
    for name, why in options.items():
        if files.config.get(name):
            raise UnsupportedAdapterError(f"adapter {files.path}: {name}={files.config[name]!r} is not supported "
                                          f"({why}); retrain or convert the adapter without it")


def check_target_modules(files: AdapterFiles, base: BaseDescription) -> None:
    """Every configured target must name something the base has (catches adapters for other models)."""
    targets = files.config.get("target_modules")
    if targets is None:
        return
    paths = list(base.linear_shapes)
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, p) for p in paths):
            raise AdapterMismatchError(f"adapter {files.path}: target_modules regex {targets!r} matches no linear "
                                       f"of base {base.name!r}; the adapter was trained for another model")
        return
    if not isinstance(targets, list | tuple) or not all(isinstance(t, str) for t in targets):
        raise UnsupportedAdapterError(f"adapter {files.path}: target_modules must be a list of names or a regex")
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        raise AdapterMismatchError(
            f"adapter {files.path}: target module(s) {', '.join(missing)} not in base {base.name!r} "
            f"(T5 targets: {', '.join(base.short_names())}); the adapter was trained for another model")


def check_layers(files: AdapterFiles, modules) -> None:
    """Tensors outside `layers_to_transform` mean the config and the weights disagree."""
    layers = files.config.get("layers_to_transform")
    if layers is None or layers == []:
        return
    allowed = {layers} if isinstance(layers, int) else set(layers)
    stray = sorted(m for m in modules if layer_index(m) not in allowed)
    if stray:
        raise AdapterMismatchError(f"adapter {files.path}: tensors for {stray[0]} lie outside layers_to_transform="
                                   f"{layers}; the config does not describe these weights, re-save the adapter")


def targets_of(modules) -> tuple[str, ...]:
    return tuple(sorted({short_name(m) for m in modules}))


def base_model_of(files: AdapterFiles) -> str | None:
    value = files.config.get("base_model_name_or_path")
    return value if isinstance(value, str) else None
