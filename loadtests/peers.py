"""The peers measured side by side with the engine, on the same base, adapters and requests.

Every peer answers `run(requests) -> RunResult` and `memory_bytes()`. The peft peers are what a
multi-adapter server looks like without peftserve:

- `HFBasePeer`: the plain base, `model.generate` (kv cache, greedy): a reference for the engine's base.
- `PeftMixedPeer`: one PeftModel holding every adapter, one mixed batch via `generate(adapter_names=...)`.
- `SwapPerRequestPeer`: the same PeftModel, `set_adapter` before each request, batch of one (a naive server).
- `MergedPerAdapterPeer`: one merged model per adapter (`merge_and_unload`), requests grouped by adapter.

The peft peers generate exactly `max_new_tokens` (min = max) so every peer does the same work.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loadtests.workload import Request


@dataclass
class RunResult:
    tokens: int  # generated tokens over all requests
    seconds: float  # wall time of the whole run
    latencies: list[float] = field(default_factory=list)  # per request: run start -> its result
    outputs: list[list[int]] = field(default_factory=list)  # per request: generated token ids


def unique_tensor_bytes(*objects) -> int:
    """Bytes of distinct storages held by modules / tensors (shared weights counted once)."""
    seen: dict[int, int] = {}
    for obj in objects:
        tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else [obj]
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _batch_result(outputs: list[list[int]], seconds: float) -> RunResult:
    """A batch that finishes together: every request's latency is the batch's."""
    return RunResult(sum(map(len, outputs)), seconds, [seconds] * len(outputs), outputs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _HFGenerate:
    """Shared by the peft peers: tokenize a batch, greedy generate exactly n tokens, count them."""

    def __init__(self, tokenizer, device: str):
        self.tokenizer = tokenizer
        self.device = device

    def generate(self, model, requests: list[Request], **extra) -> list[list[int]]:
        enc = self.tokenizer([r.text for r in requests], return_tensors="pt", padding=True).to(self.device)
        n = max(r.max_new_tokens for r in requests)
        with torch.inference_mode():
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, num_beams=1, **extra)
        _sync(self.device)
        return out[:, 1:].tolist()  # minus the decoder start token


def _load(base_dir: Path, device: str, dtype: torch.dtype):
    from serve.engine.base import load_base

    base = load_base(str(base_dir), dtype=dtype)
    return base.model.to(device), base.tokenizer


class HFBasePeer:
    name = "hf-generate base"

    def __init__(self, base_dir: Path, device: str, dtype: torch.dtype):
        self.model, tokenizer = _load(base_dir, device, dtype)
        self.gen = _HFGenerate(tokenizer, device)

    def run(self, requests: list[Request]) -> RunResult:
        t0 = time.perf_counter()
        outputs = self.gen.generate(self.model, requests)
        return _batch_result(outputs, time.perf_counter() - t0)

    def memory_bytes(self) -> int:
        return unique_tensor_bytes(self.model)


class PeftAdapters:
    """One PeftModel holding LoRA adapters by name; shared by the mixed-batch and swap peers."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path], device: str, dtype: torch.dtype):
        from peft import PeftModel

        model, tokenizer = _load(base_dir, device, dtype)
        self.base_bytes = unique_tensor_bytes(model)
        items = list(adapters.items())
        self.model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
        for name, path in items[1:]:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()
        self.names = [name for name, _ in items]
        self.gen = _HFGenerate(tokenizer, device)
        self.adapter_bytes = (unique_tensor_bytes(self.model) - self.base_bytes) // len(items)

    def memory_bytes(self, n: int | None = None) -> int:
        """Base + n resident adapters (default: all loaded)."""
        return self.base_bytes + self.adapter_bytes * (len(self.names) if n is None else n)


class PeftMixedPeer:
    name = "peft mixed batch"

    def __init__(self, adapters: PeftAdapters):
        self.adapters = adapters

    def run(self, requests: list[Request]) -> RunResult:
        names = [r.adapter or "__base__" for r in requests]  # "__base__": peft's name for base rows
        t0 = time.perf_counter()
        outputs = self.adapters.gen.generate(self.adapters.model, requests, adapter_names=names)
        return _batch_result(outputs, time.perf_counter() - t0)

    def memory_bytes(self, n: int | None = None) -> int:
        return self.adapters.memory_bytes(n)


class SwapPerRequestPeer:
    """A naive server: requests one at a time, in arrival order, `set_adapter` before each."""

    name = "peft swap per request"

    def __init__(self, adapters: PeftAdapters):
        self.adapters = adapters

    def run(self, requests: list[Request]) -> RunResult:
        model, outputs, latencies = self.adapters.model, [], []
        t0 = time.perf_counter()
        for r in requests:
            if r.adapter is None:
                with model.disable_adapter():
                    outputs += self.adapters.gen.generate(model, [r])
            else:
                model.set_adapter(r.adapter)
                outputs += self.adapters.gen.generate(model, [r])
            latencies.append(time.perf_counter() - t0)
        return RunResult(sum(map(len, outputs)), time.perf_counter() - t0, latencies, outputs)

    def memory_bytes(self, n: int | None = None) -> int:
        return self.adapters.memory_bytes(n)


class MergedPerAdapterPeer:
    """One merged model per adapter; requests grouped by adapter, groups served one after another.

    Only `max_models` models are materialized (each costs a copy of every adapted weight); adapters
    beyond that share a pool model round-robin, which costs the same compute, and `memory_bytes`
    projects the memory the full set would need (`projected` is True then).
    """

    name = "merged model per adapter"

    def __init__(self, base_dir: Path, adapters: dict[str, Path], device: str, dtype: torch.dtype,
                 max_models: int):
        from peft import PeftModel

        self.template, tokenizer = _load(base_dir, device, dtype)
        self.gen = _HFGenerate(tokenizer, device)
        template_params = dict(self.template.named_parameters())
        self.models: list[torch.nn.Module] = []
        for name, path in list(adapters.items())[:max_models]:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self.template), str(path), adapter_name=name)
            merged = peft_model.merge_and_unload().eval()
            _share_unchanged(merged, template_params)
            self.models.append(merged)
        self.route = {name: self.models[i % len(self.models)] for i, name in enumerate(adapters)}
        self.count = len(adapters)
        self.projected = self.count > len(self.models)

    def run(self, requests: list[Request]) -> RunResult:
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        latencies = [0.0] * len(requests)
        outputs: list[list[int]] = [[] for _ in requests]
        t0 = time.perf_counter()
        for name, rows in groups.items():
            model = self.template if name is None else self.route[name]
            group_out = self.gen.generate(model, [requests[i] for i in rows])
            done = time.perf_counter() - t0
            for i, out in zip(rows, group_out, strict=True):
                latencies[i], outputs[i] = done, out
        return RunResult(sum(map(len, outputs)), time.perf_counter() - t0, latencies, outputs)

    def memory_bytes(self, n: int | None = None) -> int:
        """Base + one merged model per adapter (n adapters; default all), extrapolated per model."""
        base = unique_tensor_bytes(self.template)
        per_model = (unique_tensor_bytes(self.template, *self.models) - base) / max(1, len(self.models))
        return int(base + per_model * (self.count if n is None else n))


def _share_unchanged(model: torch.nn.Module, template_params: dict[str, torch.nn.Parameter]) -> None:
    """Point parameters the merge left untouched (embeddings, norms, head) at the template's storage."""
    for name, p in list(model.named_parameters()):
        t = template_params.get(name)
        if t is not None and t.shape == p.shape and torch.equal(t, p):
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name) if module_name else model, attr, t)
