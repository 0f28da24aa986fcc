"""RowAdapters: which adapter (kind, slot) each batch row uses — the explicit per-batch state."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .errors import SlotError
from .kinds import AdapterKind

IDENTITY = 0  # slot tensor index 0 of every kind is the identity (zeros for LoRA/BitFit, ones for (IA)3)


@dataclass(frozen=True)
class RowAdapters:
    pairs: tuple[tuple[AdapterKind, int] | None, ...]

    @classmethod
    def from_pairs(cls, pairs) -> RowAdapters:
        """pairs: one (kind, slot) per row, or None for a base row. Slots count from 0 per kind."""
        norm = []
        for i, p in enumerate(pairs):
            if p is None:
                norm.append(None)
                continue
            try:
                kind, slot = AdapterKind(p[0]), int(p[1])
            except (TypeError, ValueError, IndexError):
                raise SlotError(f"row {i}: expected (kind, slot) or None, got {p!r}") from None
            if slot < 0:
                raise SlotError(f"row {i}: slot {slot} is negative")
            norm.append((kind, slot))
        return cls(tuple(norm))

    @classmethod
    def base(cls, n: int) -> RowAdapters:
        return cls((None,) * n)

    def __len__(self) -> int:
        return len(self.pairs)

    @cached_property
    def _index(self) -> dict[AdapterKind, tuple[int, ...]]:
        out = {}
        for kind in AdapterKind:
            out[kind] = tuple(p[1] + 1 if p is not None and p[0] == kind else IDENTITY for p in self.pairs)
        return out

    def slot_index(self, kind: AdapterKind) -> tuple[int, ...]:
        """Per row, the slot-tensor index for `kind`: slot + 1, or IDENTITY for rows not using it."""
        return self._index[kind]

    @cached_property
    def kinds(self) -> frozenset[AdapterKind]:
        return frozenset(p[0] for p in self.pairs if p is not None)

    def uses(self, kind: AdapterKind) -> bool:
        return kind in self.kinds
