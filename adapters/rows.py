"""RowAdapters: which adapters each batch row uses — the explicit per-batch state.

A row is the plain base (no terms), one adapter, or a short combination of adapters. Each term is
(kind, slot, weight). A row holds at most one adapter of each kind, except LoRA: several LoRAs on a row add
their weighted deltas (y = W x + Σ wᵢ Bᵢ Aᵢ x), one more gathered term in the same batched matmuls. Every
other kind acts in its own place (docs/ADAPTERS.md, "Several adapters on one row").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from .errors import SlotError
from .kinds import AdapterKind

IDENTITY = 0  # slot tensor index 0 of every kind is the identity (zeros for LoRA/BitFit, ones for (IA)3)


class RowTerm(NamedTuple):
    kind: AdapterKind
    slot: int  # counts from 0 per kind (the slot tensor index is slot + 1)
    weight: float = 1.0  # only LoRA terms may carry a weight other than 1


def _term(i: int, t) -> RowTerm:
    try:
        kind, slot = AdapterKind(t[0]), int(t[1])
        weight = float(t[2]) if len(t) > 2 else 1.0
    except (TypeError, ValueError, IndexError):
        raise SlotError(f"row {i}: expected (kind, slot) or (kind, slot, weight), got {t!r}") from None
    if slot < 0:
        raise SlotError(f"row {i}: slot {slot} is negative")
    if not math.isfinite(weight):
        raise SlotError(f"row {i}: weight {weight} is not finite")
    if weight != 1.0 and kind != AdapterKind.LORA:
        raise SlotError(f"row {i}: a {kind} adapter takes no weight (got {weight}); only LoRA deltas are weighted")
    return RowTerm(kind, slot, weight)


@dataclass(frozen=True)
class RowAdapters:
    rows: tuple[tuple[RowTerm, ...], ...]  # per row its terms; () = a base row

    @classmethod
    def from_pairs(cls, pairs) -> RowAdapters:
        """pairs: one (kind, slot) per row, or None for a base row. Slots count from 0 per kind."""
        return cls.from_rows(None if p is None else [p] for p in pairs)

    @classmethod
    def from_rows(cls, rows) -> RowAdapters:
        """rows: per row None (base), one (kind, slot), or a list of (kind, slot[, weight]) terms."""
        out = []
        for i, row in enumerate(rows):
            if row is None:
                out.append(())
                continue
            if len(row) and not isinstance(row[0], (tuple, list)):
                row = [row]  # a single (kind, slot)
            terms = tuple(_term(i, t) for t in row)
            kinds = [t.kind for t in terms if t.kind != AdapterKind.LORA]
            if len(kinds) != len(set(kinds)):
                raise SlotError(f"row {i}: at most one adapter of each kind other than LoRA per row, got {kinds}")
            out.append(terms)
        return cls(tuple(out))

    @classmethod
    def base(cls, n: int) -> RowAdapters:
        return cls(((),) * n)

    def __len__(self) -> int:
        return len(self.rows)

    def terms(self):
        """Every (row index, term) of the batch."""
        return ((i, t) for i, row in enumerate(self.rows) for t in row)

    @cached_property
    def _index(self) -> dict[AdapterKind, tuple[int, ...]]:
        out = {}
        for kind in AdapterKind:
            out[kind] = tuple(next((t.slot + 1 for t in row if t.kind == kind), IDENTITY) for row in self.rows)
        return out

    def slot_index(self, kind: AdapterKind) -> tuple[int, ...]:
        """Per row, the slot-tensor index for `kind`: slot + 1, or IDENTITY for rows not using it.
        For LoRA only meaningful when `combined_lora` is False (one unweighted LoRA per row at most)."""
        return self._index[kind]

    @cached_property
    def lora_terms(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        """Per row its LoRA terms as (slot-tensor index, weight); () for rows without LoRA."""
        return tuple(tuple((t.slot + 1, t.weight) for t in row if t.kind == AdapterKind.LORA) for row in self.rows)

    @cached_property
    def combined_lora(self) -> bool:
        """Some row sums several LoRAs or weights one: the LoRA gather concatenates terms along the rank."""
        return any(len(terms) > 1 or (terms and terms[0][1] != 1.0) for terms in self.lora_terms)

    @cached_property
    def kinds(self) -> frozenset[AdapterKind]:
        return frozenset(t.kind for _, t in self.terms())

    def uses(self, kind: AdapterKind) -> bool:
        return kind in self.kinds
