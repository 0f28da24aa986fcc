"""Low-resource fine-tuning recipes on top of any method (docs/TRAINING.md, "Recipes"): how the task is
presented and what the loss is, not which weights train. `vanilla` is plain fine-tuning; `pattern`
(pattern-based fine-tuning), `distill` (context distillation) and `adaptive` (span-corruption continued
pre-training, then the task) each change one or two steps of the one training loop (training/train.py).
"""

from __future__ import annotations


def make_recipe(cfg):
    """The recipe object for a validated TrainConfig."""
    if cfg.recipe == "pattern":
        from training.recipes.pattern import PatternRecipe

        return PatternRecipe(cfg)
    if cfg.recipe == "distill":
        from training.recipes.distill import DistillRecipe

        return DistillRecipe(cfg)
    if cfg.recipe == "adaptive":
        from training.recipes.adaptive import AdaptiveRecipe

        return AdaptiveRecipe(cfg)
    from training.recipes.base import Recipe

    return Recipe(cfg)
