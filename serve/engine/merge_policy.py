"""(IA)3 merge policy: which adapter, if any, is folded into the base weights for the next forward.

Pure decisions over explicit inputs (the rows' adapter keys and kinds); the engine applies them with
AdapterSlots.merge / unmerge (exact) and pins the merged adapter's slot while it is merged.

- "auto": merge when every row used the same (IA)3 adapter for `after_steps` consecutive forwards
  (a merge copies every targeted weight, so a brief uniform moment is not worth it); unmerge as soon as
  the rows mix (correctness: other rows must see the plain base).
- "dedicated": merge `dedicated` as soon as the rows are all it; keep it merged while idle.
- "never": always the per-row path.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


class MergePolicy:
    def __init__(self, mode: str, after_steps: int = 0, dedicated: str | None = None):
        if mode not in ("auto", "dedicated", "never"):
            raise ValueError(f"unknown merge mode {mode!r}")
        self.mode, self.after_steps, self.dedicated = mode, after_steps, dedicated
        self._uniform_key: Hashable | None = None
        self._uniform_steps = 0

    def target(self, rows: Sequence[tuple[Hashable | None, str]], merged: Hashable | None) -> Hashable | None:
        """The key that should be merged for a forward over `rows` ((key, kind) per row; key None = base).
        Returning `merged` means: leave things as they are."""
        if self.mode == "never" or not rows:
            return merged
        keys = {key for key, _ in rows}
        uniform = next(iter(keys)) if len(keys) == 1 and rows[0][1] == "ia3" else None
        if self.mode == "dedicated" and uniform is not None and _name(uniform) != self.dedicated:
            uniform = None
        self._uniform_steps = self._uniform_steps + 1 if uniform is not None and uniform == self._uniform_key else 0
        self._uniform_key = uniform
        if uniform is None or uniform == merged:
            return uniform
        if self.mode == "auto" and self._uniform_steps < self.after_steps:
            return None  # not yet worth it (and a different merged adapter must go)
        return uniform

    def release_when_idle(self, merged: Hashable | None, removed: bool, others_waiting: bool) -> bool:
        """No rows run: undo the merge if its adapter was removed or (auto) others wait for slots."""
        return merged is not None and (removed or (self.mode == "auto" and others_waiting))


def _name(key: Hashable) -> str:
    return key[0] if isinstance(key, tuple) else str(key)
