"""Offline metrics: the project's own `evaluate` modules, loaded from this package by path (no hub)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
# task type -> (evaluate module directory, key in its result)
TASK_METRICS = {"classification": ("exact_match", "exact_match"), "generation": ("rouge_l", "rougeL")}


@cache
def load_metric(name: str):
    """`evaluate.load` on the local module directory: works with HF_HUB_OFFLINE=1."""
    import evaluate

    path = HERE / name
    if not (path / f"{name}.py").exists():
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(sorted(m for m, _ in TASK_METRICS.values()))}")
    return evaluate.load(str(path))


def score(task: str, predictions: list[str], references: list) -> tuple[str, float]:
    """(metric key, value) for a task type: exact match for classification, ROUGE-L for generation."""
    module, key = TASK_METRICS[task]
    return key, float(load_metric(module).compute(predictions=predictions, references=references)[key])
