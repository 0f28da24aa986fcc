"""Context distillation: without the context, the student agrees with the teacher-with-context clearly more
than the bare base does, on held-out inputs: in greedy outputs served by the engine (the adapter unchanged),
and in token distributions (KL to the teacher's, teacher-forced on the teacher's outputs)."""

from __future__ import annotations

import pytest

CONTEXT = "You are a careful assistant. Always answer in a cheerful tone and keep it short, please."


def test_student_without_context_agrees_with_the_teacher_with_context(tiny_base_dir, tmp_path):
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
    from training.config import TrainConfig
    from training.tasks import sentiment, write_jsonl
    from training.train import train

    # rows need only an input: no target column at all
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"text": r["text"]} for r in sentiment(96, 3)])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": r["text"]} for r in sentiment(24, 9)])
    held_out = [r["text"] for r in sentiment(40, 77)]  # neither trained on nor used to pick the best step
    cfg = TrainConfig(method="lora", recipe="distill", context=CONTEXT, train=str(train_file), eval=str(eval_file),
                      output=tmp_path / "student", base=str(tiny_base_dir), input_field="text", learning_rate=3e-3,
                      target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"], batch_size=16, max_steps=40,
                      eval_every=20, patience=0, dropout=0.0, max_target_length=8, progress=False)
    report = train(cfg).report
    assert report["recipe"] == "distill" and report["distill"]["targets"] == "teacher_greedy"

    engine = Engine.from_config(EngineConfig(base=str(tiny_base_dir)))
    try:
        engine.register_adapter("student", cfg.output)

        def say(inputs, adapter=None):
            params = GenerationParams(max_new_tokens=8)
            return [r.text.strip() for r in engine.generate(
                [GenerationRequest(inputs=x, adapter=adapter, params=params) for x in inputs])]

        teacher = say([f"{CONTEXT}\n\n{x}" for x in held_out])  # the teacher: the base reading the context
        bare, student = say(held_out), say(held_out, "student")
    finally:
        engine.close()

    def agreement(said):
        return sum(a == b for a, b in zip(said, teacher, strict=True)) / len(teacher)

    # baselines measured here, on the same held-out inputs: the base without the context
    assert agreement(student) >= agreement(bare) + 0.15, (agreement(student), agreement(bare), student, teacher)
    kl_student, kl_bare = kl_to_teacher(tiny_base_dir, cfg.output, held_out, teacher)
    assert kl_student < 0.5 * kl_bare, (kl_student, kl_bare)
    # the training report says the same on its own eval rows
    assert report["in_domain_metrics"]["teacher_agreement"] > report["distill"]["base_teacher_agreement"]


def test_distill_loss_is_zero_for_the_teacher_and_positive_otherwise():
    import torch

    from training.recipes.distill import distill_loss

    logits = torch.randn(2, 3, 11)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(distill_loss(logits, logits, mask)) == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[0, 2] += 50.0  # a masked position: does not count
    assert float(distill_loss(other, logits, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(torch.randn(2, 3, 11), logits, mask)) > 0.1


def kl_to_teacher(base_dir, adapter_dir, inputs: list[str], teacher_says: list[str]) -> tuple[float, float]:
    """Mean KL(teacher-with-context || model-without-it) over the teacher's output tokens: (student, bare base)."""
    import copy

    import torch
    from peft import PeftModel

    from serve.engine import load_base
    from training.recipes.distill import distill_loss

    base = load_base(str(base_dir))
    tok, model = base.tokenizer, base.model
    student = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()
    labels = tok(teacher_says, return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    bare_in = tok(inputs, return_tensors="pt", padding=True)
    ctx_in = tok([f"{CONTEXT}\n\n{x}" for x in inputs], return_tensors="pt", padding=True)
    with torch.no_grad():
        teacher = model(**ctx_in, labels=labels).logits
        out = [float(distill_loss(m(**bare_in, labels=labels).logits, teacher, labels != -100))
               for m in (student, model)]
    return out[0], out[1]
