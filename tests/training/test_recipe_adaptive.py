"""Adaptive fine-tuning: one run does span-corruption continued pre-training on unlabelled in-domain text (the
held-out span-corruption loss falls, against the base's measured here) and then the task, through one adapter."""

from __future__ import annotations

import random

import pytest


def test_span_corruption_hides_spans_behind_sentinels():
    from training.recipes.adaptive import span_corrupt

    ids, sentinels, eos = list(range(10, 50)), [900, 901, 902, 903, 904, 905], 1
    inputs, targets = span_corrupt(ids, sentinels, eos, random.Random(0))
    hidden = [t for t in targets if t not in sentinels and t != eos]
    kept = [t for t in inputs if t not in sentinels and t != eos]
    assert sorted(hidden + kept) == ids and kept == [t for t in ids if t not in hidden]  # a partition, in order
    assert len(hidden) == 6  # 15% of 40
    used = [t for t in inputs if t in sentinels]
    assert used == sentinels[:len(used)] and targets[0] == sentinels[0] and targets[-2:] == [sentinels[len(used)], eos]


def test_adaptive_run_lowers_the_held_out_span_corruption_loss(tiny_base_dir, tmp_path):
    from adapters import BaseDescription, inspect_adapter
    from serve.engine import load_base
    from training.config import TrainConfig
    from training.recipes.adaptive import AdaptiveRecipe
    from training.tasks import sentiment, write_task
    from training.train import train

    domain = tmp_path / "domain.txt"  # unlabelled text of the task's domain
    domain.write_text("\n".join(f"{r['text']} {r['text'].upper()}" for r in sentiment(200, 5)))
    tr, ev = write_task(tmp_path / "task", "sentiment", n_train=64, n_eval=16)
    cfg = TrainConfig(method="lora", recipe="adaptive", domain_text=str(domain), adaptive_steps=20, train=str(tr),
                      eval=str(ev), output=tmp_path / "adaptive", base=str(tiny_base_dir), input_field="text",
                      target_field="label", learning_rate=3e-3, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
                      batch_size=8, max_steps=4, eval_every=4, patience=0, dropout=0.0, max_target_length=4,
                      progress=False)
    report = train(cfg).report
    phase1 = report["adaptive"]
    # the baseline, measured here on the same held-out corruption: the untrained base
    base = load_base(str(tiny_base_dir))
    recipe = AdaptiveRecipe(cfg)
    recipe.prepare_model(base, base.model.device, None, None, {})
    base_loss = recipe.held_out_loss(base.model, base.model.device, base.tokenizer.pad_token_id)
    assert phase1["held_out_loss_before"] == pytest.approx(base_loss, rel=1e-4)
    assert phase1["held_out_loss_after"] < 0.7 * base_loss, phase1
    # one command, both phases in the report; the task phase ran after it, on the same adapter
    assert phase1["steps"] == 20 and phase1["held_out_documents"] == 20 and report["steps"] == 4
    assert report["train_seconds"] > phase1["seconds"]
    spec = inspect_adapter(cfg.output, BaseDescription.from_model(base.model, base.name, base.fingerprint))
    assert spec.kind.value == "lora"
