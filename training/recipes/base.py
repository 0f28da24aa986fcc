"""The recipe interface and `vanilla` (plain fine-tuning): what each hook of the training loop does by default.

Order in training/train.py: `load` (every data set) -> `prepare_data` (no model) -> the base is loaded ->
`prepare_model` -> `before_task` (once the trainable model exists) -> `batches` / `loss` per step ->
`score` on the best evaluation and every OOD set -> `after_save` inside the staged output -> `report`.
"""

from __future__ import annotations

import json
from pathlib import Path

from training import data as D
from training.metrics import score


class Recipe:
    name = "vanilla"
    needs_targets = True  # every row needs a target (distill: only an input)

    def __init__(self, cfg):
        self.cfg = cfg

    def load(self, spec: str, max_samples: int | None, split: str = "train") -> D.TextPairs:
        c = self.cfg
        return D.load_pairs(spec, c.input_field, c.target_field, c.template, max_samples, c.seed, split=split)

    def prepare_data(self, train: D.TextPairs, ev: D.TextPairs, ood: dict) -> tuple:
        """Checks and transformations that need only the data; returns (train, eval, ood)."""
        return train, ev, ood

    def prepare_model(self, base, device, train: D.TextPairs, ev: D.TextPairs, ood: dict) -> tuple:
        """Checks and work that need the base (before the first optimizer step); returns (train, eval, ood)."""
        return train, ev, ood

    def infer_task(self, train: D.TextPairs) -> str:
        return D.infer_task(train, self.cfg.task)

    def before_task(self, trainable, device, tokenizer) -> None:
        """Work on the trainable model before the task's first step (adaptive: continued pre-training)."""

    def batches(self, tokenizer, train: D.TextPairs):
        c = self.cfg
        encoded = D.encode_pairs(tokenizer, train, c.max_source_length, c.max_target_length)
        return D.batches(encoded, c.batch_size, tokenizer.pad_token_id, c.seed)

    def loss(self, model, batch, device):
        return model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     labels=batch.labels.to(device)).loss

    def score(self, task: str, predictions: list[str], pairs: D.TextPairs) -> dict:
        metric, value = score(task, predictions, pairs.targets)
        return {"metric": metric, "value": value, "rows": len(pairs)}

    def after_save(self, out: Path) -> None:
        """Add what the recipe records to the saved adapter (inside the staged output directory)."""

    def report(self) -> dict:
        return {}


def add_to_adapter_config(out: Path, extra: dict) -> bool:
    """Merge keys into out/adapter_config.json; False when the output has none (full fine-tuning)."""
    path = Path(out) / "adapter_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    config.update(extra)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return True
