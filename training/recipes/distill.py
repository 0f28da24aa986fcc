"""Context distillation: a student without the context learns the teacher-with-context's token distributions.

The teacher is the base (default), `--teacher DIR` (a whole model with the base's vocabulary) or
`--teacher-adapter DIR` (the base plus a PEFT adapter), frozen, reading `context + demonstrations + input`
(training/icl.py's format; `--shots K` draws the demonstrations from the training rows). The student is the
base plus the method being trained, reading the input alone. The loss is KL(teacher || student) summed over
the vocabulary and averaged over target positions, teacher-forced on the row's target when the rows have
one, else on the teacher's own greedy output (computed once, before training). Rows need only `input`.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F

from training import data as D
from training.errors import DataError, TrainConfigError
from training.icl import build_prompt, draw_shots
from training.recipes.base import Recipe
from training.recipes.options import context_text


class DistillRecipe(Recipe):
    name = "distill"
    needs_targets = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.context = context_text(cfg)
        self.shots: list[tuple[str, str]] = []
        self.details: dict = {}

    def load(self, spec, max_samples, split="train"):
        """Rows with an input; the target column is optional ('' where a row has none)."""
        c = self.cfg
        return D.load_pairs(spec, c.input_field, c.target_field, c.template, max_samples, c.seed, split=split,
                            require_targets=False)

    def prepare_data(self, train, ev, ood):
        if self.cfg.shots:
            self.shots = draw_shots(train.sources, train.targets, self.cfg.shots, self.cfg.seed, self.cfg.train)
        return train, ev, ood

    def teacher_source(self, source: str) -> str:
        return build_prompt(self.shots, source, self.context)

    def prepare_model(self, base, device, train, ev, ood):
        from training.greedy import generate

        self.teacher = self._load_teacher(base).to(device).eval()
        self.tokenizer = base.tokenizer
        c = self.cfg
        longest = max(len(self.tokenizer(self.teacher_source(s))["input_ids"]) for s in train.sources[:64])
        self.teacher_max_source = c.max_source_length + longest  # the context must not be cut off

        def teacher_says(sources):
            return generate(self.teacher, self.tokenizer, [self.teacher_source(s) for s in sources], device,
                            self.teacher_max_source, c.max_target_length, c.eval_batch_size)

        given = all(t.strip() for t in train.targets)
        if not given:
            train = D.TextPairs(train.sources, _nonempty(teacher_says(train.sources)), train.source_name)
        # held-out agreement with the teacher: the bare base now (before any training) is the baseline
        self.eval_teacher, self.eval_sources = _nonempty(teacher_says(ev.sources)), ev.sources
        bare = generate(base.model.to(device), self.tokenizer, ev.sources, device, c.max_source_length,
                        c.max_target_length, c.eval_batch_size)
        self.details = {"targets": "given" if given else "teacher_greedy", "context_chars": len(self.context),
                        "shots": len(self.shots), "teacher": c.teacher or c.teacher_adapter or "base",
                        "base_teacher_agreement": _agreement(bare, self.eval_teacher)}
        if not all(t.strip() for t in ev.targets):
            ev = D.TextPairs(ev.sources, self.eval_teacher, ev.source_name)
        ood = {n: p if all(t.strip() for t in p.targets) else
               D.TextPairs(p.sources, _nonempty(teacher_says(p.sources)), p.source_name) for n, p in ood.items()}
        return train, ev, ood

    def _load_teacher(self, base):
        c = self.cfg
        if c.teacher is not None:
            from serve.engine import load_base

            teacher = load_base(c.teacher)
            check_same_vocabulary(teacher, base, c.teacher)
            return teacher.model
        model = copy.deepcopy(base.model)  # frozen: the student's method changes base.model in place
        if c.teacher_adapter is not None:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, c.teacher_adapter)
            except Exception as e:  # noqa: BLE001 - peft raises many types for a directory it cannot read
                raise TrainConfigError(f"--teacher-adapter {c.teacher_adapter}: peft cannot load it on the base "
                                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        model.requires_grad_(False)
        return model

    def batches(self, tokenizer, train):
        """Shuffled (student batch, teacher batch) pairs over the same rows and targets, endlessly."""
        c = self.cfg
        student = D.encode_pairs(tokenizer, train, c.max_source_length, c.max_target_length)
        teacher_pairs = D.TextPairs([self.teacher_source(s) for s in train.sources], train.targets, "teacher")
        teacher = D.encode_pairs(tokenizer, teacher_pairs, self.teacher_max_source, c.max_target_length)
        rng, epoch = random.Random(c.seed), 0
        while True:
            order = list(range(len(student)))
            rng.shuffle(order)
            for start in range(0, len(order), c.batch_size):
                idx = order[start:start + c.batch_size]
                yield epoch, (D.collate([student[i] for i in idx], tokenizer.pad_token_id),
                              D.collate([teacher[i] for i in idx], tokenizer.pad_token_id))
            epoch += 1

    def loss(self, model, batch, device):
        student, teacher = batch
        labels = student.labels.to(device)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=teacher.input_ids.to(device),
                                    attention_mask=teacher.attention_mask.to(device), labels=labels).logits
        s_logits = model(input_ids=student.input_ids.to(device), attention_mask=student.attention_mask.to(device),
                         labels=labels).logits
        return distill_loss(s_logits, t_logits, labels != -100)

    def score(self, task, predictions, pairs):
        out = super().score(task, predictions, pairs)
        if pairs.sources is self.eval_sources:  # the in-domain eval set: how often the student says what the teacher says
            out["teacher_agreement"] = _agreement(predictions, self.eval_teacher)
        return out

    def infer_task(self, train):
        """Teacher outputs may all be one string: that is a generation target, not a 1-label classification."""
        task = super().infer_task(train)
        return "generation" if self.cfg.task == "auto" and len(train.label_set) < 2 else task

    def report(self):
        return {"distill": self.details}


def distill_loss(student_logits, teacher_logits, mask) -> torch.Tensor:
    """KL(teacher || student) per target position (summed over the vocabulary), averaged over real positions."""
    kl = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                  log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def check_same_vocabulary(teacher, base, source: str) -> None:
    """The KL compares distributions id by id: the teacher must share the base's vocabulary exactly."""
    t_size, b_size = teacher.model.config.vocab_size, base.model.config.vocab_size
    if t_size != b_size or teacher.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise TrainConfigError(f"--teacher {source} does not match the base's vocabulary (teacher: {t_size} "
                               f"logits, {len(teacher.tokenizer)} tokens; base {base.name}: {b_size} logits, "
                               f"{len(base.tokenizer)} tokens); distillation compares token distributions, so use "
                               "a teacher of the same model family / tokenizer")


def _agreement(predictions: list[str], teacher: list[str]) -> float:
    return sum(p.strip() == t.strip() for p, t in zip(predictions, teacher, strict=True)) / max(1, len(teacher))


def _nonempty(texts: list[str]) -> list[str]:
    if not any(t.strip() for t in texts):
        raise DataError("the teacher generated only empty outputs for these inputs; give targets in the rows, "
                        "or a teacher / context that answers")
    return [t if t.strip() else " " for t in texts]
