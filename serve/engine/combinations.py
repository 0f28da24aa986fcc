"""What a request's adapters resolve to: registrations, the terms of a row, and the derived adapters of ties/dare.

A row's terms are (cache key, kind, weight). One adapter is one term; a `linear` combination is one term per
adapter, applied together on the row (adapters/rows.py); a `ties`/`dare_*` combination is one term, a LoRA
merged by PEFT's functions. That derived adapter is registered in the engine's cache like any other (LRU in
the host and device tiers): its first request waits for the build on a loader thread, later ones do not.
The derived set is itself bounded (`max_derived_adapters`, LRU) and dropped with any of its sources.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from serve.engine.errors import RequestValidationError, UnknownAdapterError

FIELD = "merged_adapters"


@dataclass(frozen=True)
class Registered:
    spec: object  # adapters.AdapterSpec (module paths interned: 10,000 registrations stay small)
    key: tuple[str, int]  # (name, version): a replaced adapter is a new cache key

    @property
    def kind(self) -> str:
        return str(self.spec.kind)

    @property
    def method(self) -> str:  # the metrics label: the PEFT method as trained (dora, adalora, p_tuning...)
        return self.spec.method_name


@dataclass(frozen=True)
class Term:
    key: tuple[str, int]
    kind: str
    weight: float = 1.0


@dataclass(frozen=True)
class DerivedSource:
    """What the cache's loader builds for a derived adapter: the parts' specs, weights and merge options."""

    parts: tuple  # AdapterSpec of each source adapter
    weights: tuple[float, ...]
    options: object  # adapters.combine.MergeOptions
    spec: object  # the derived AdapterSpec (adapters.combine.derived_spec)

    @property
    def seed(self) -> int:  # dare's random drops: the same on every node and every rebuild
        return zlib.crc32(self.spec.name.encode())


def combination_label(regs: list[Registered], strategy: str) -> str:
    """Metrics label of a combination: its strategy or its set of kinds, never names (bounded cardinality)."""
    if strategy != "linear":
        return strategy
    return "combined:" + "+".join(sorted({r.kind for r in regs}))


def resolve(merged, lookup, max_adapters: int, lora_slots: int):
    """(registrations, weights, MergeOptions) of a request's `merged_adapters`, validated once against the
    registry. Raises UnknownAdapterError (404) or RequestValidationError naming the problem (422)."""
    from adapters.combine import CombinationError, MergeOptions, check_combination

    regs = []
    for name in merged.ids:
        reg = lookup(name)
        if reg is None:
            raise UnknownAdapterError(name)
        regs.append(reg)
    weights = merged.resolved_weights()
    options = MergeOptions(merged.merge_strategy, merged.density, merged.majority_sign_method)
    try:
        check_combination([r.spec for r in regs], weights, options, max_adapters)
    except CombinationError as e:
        raise RequestValidationError(FIELD, str(e)) from None
    loras = sum(r.kind == "lora" for r in regs)
    if options.strategy == "linear" and loras > lora_slots:
        raise RequestValidationError(FIELD, f"{loras} LoRAs on one row need {loras} LoRA slots, and this server has "
                                            f"{lora_slots} (device_slots['lora']); combine fewer LoRAs")
    return regs, [float(w) for w in weights], options


def described(regs: list[Registered], weights: list[float]) -> list[dict]:
    """What a combination resolved to, for response details: each id with the version served."""
    return [{"id": r.key[0], "version": r.key[1], "weight": w} for r, w in zip(regs, weights, strict=True)]


class DerivedAdapters:
    """The derived adapters of ties/dare combinations, keyed by their resolved parts (versions included)."""

    def __init__(self, cache, capacity: int) -> None:
        self._cache, self._capacity = cache, capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Registered] = OrderedDict()

    def get_or_add(self, regs: list[Registered], weights: list[float], options) -> Registered:
        from adapters.combine import derived_spec

        ident = (options, tuple(zip((r.key for r in regs), weights, strict=True)))
        with self._lock:
            reg = self._entries.get(ident)
            if reg is not None:
                self._entries.move_to_end(ident)
                return reg
            parts = ",".join(f"{r.key[0]}@v{r.key[1]}:{w:g}" for r, w in zip(regs, weights, strict=True))
            extra = f";density={options.density:g}" + (f";{options.majority_sign_method}"
                                                         if options.strategy != "dare_linear" else "")
            name = f"{options.strategy}({parts}{extra})"
            spec = derived_spec([r.spec for r in regs], options, name)
            reg = Registered(spec, (name, 0))
            self._cache.add(reg.key, "lora", DerivedSource(tuple(r.spec for r in regs), tuple(weights), options, spec),
                            int(spec.size_bytes))
            self._entries[ident] = reg
            while len(self._entries) > self._capacity:
                _, old = self._entries.popitem(last=False)
                self._cache.discard(old.key)  # rows running on it finish first
            return reg

    def drop_using(self, key: tuple[str, int]) -> None:
        """A source adapter was removed or replaced: its derived adapters go too."""
        with self._lock:
            gone = [ident for ident in self._entries if any(k == key for k, _ in ident[1])]
            for ident in gone:
                self._cache.discard(self._entries.pop(ident).key)

    def __len__(self) -> int:
        return len(self._entries)
