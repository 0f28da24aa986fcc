"""In-context learning prompts: k demonstrations from the training rows, then the query.

The format (docs/TRAINING.md, "In-context learning"): each demonstration is its source (the row's input
after --input-field/--template), a newline, its target; demonstrations and the query are separated by a
blank line; the query is the source alone. With 0 shots the prompt is the source itself. The same k
demonstrations (a seeded sample of the training rows, in sampled order) precede every query, so scores
vary with --seed, not from row to row. Context distillation's `--shots` uses the same demonstrations.
"""

from __future__ import annotations

import random

from training.errors import DataError

SEPARATOR = "\n\n"


def draw_shots(sources: list[str], targets: list[str], k: int, seed: int = 0, where: str = "--train"
               ) -> list[tuple[str, str]]:
    """k (source, target) demonstrations, a seeded sample without replacement."""
    if k > len(sources):
        raise DataError(f"--shots {k} is larger than the training set ({len(sources)} rows in {where}); lower "
                        "--shots or give more rows")
    if any(not str(t).strip() for t in targets):
        raise DataError(f"--shots needs training rows with targets (demonstrations are input + answer); {where} "
                        "has rows without one")
    picked = random.Random(seed).sample(range(len(sources)), k)
    return [(sources[i], targets[i]) for i in picked]


def demonstrations(shots: list[tuple[str, str]]) -> str:
    return SEPARATOR.join(f"{s}\n{t}" for s, t in shots)


def build_prompt(shots: list[tuple[str, str]], query: str, context: str = "") -> str:
    """[context] [demonstrations] query, each part separated by a blank line."""
    return SEPARATOR.join(part for part in (context, demonstrations(shots), query) if part)
