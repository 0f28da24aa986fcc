"""Adaptive fine-tuning: continued pre-training on unlabelled in-domain text, then the task, in one run.

Phase 1 trains the method's own weights (the same LoRA / (IA)3 / prompt... adapter the task then trains;
every weight for `full`) with T5's span-corruption objective for `--adaptive-steps` steps: ~15% of each
document's tokens, in spans of mean length 3, are replaced by sentinel tokens in the input; the target is
each sentinel followed by the tokens it hides (Raffel et al. 2020, section 3.1.4). A fresh corruption is
drawn for every training batch; the held-out documents (10%, at least one) get one fixed corruption, whose
loss is measured before and after phase 1. Phase 2 is the ordinary task fine-tuning. The report's
`adaptive` entry covers phase 1; the rest of the report is phase 2 (time and peak memory cover both).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from training import data as D
from training.errors import DataError, TrainConfigError
from training.recipes.base import Recipe
from training.recipes.options import adaptive_steps

NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0
HELD_OUT_FRACTION = 0.1


def read_domain_text(spec: str, field: str = "input") -> list[str]:
    """Documents: the non-empty lines of a text file, or the `text` (else `field`) column of a .jsonl/.json/.csv
    file (so a task's training file can serve as its unlabelled domain text)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in D.LOCAL_FORMATS:
        rows = D.load_rows(spec)
        field = "text" if "text" in rows.column_names else field
        if field not in rows.column_names:
            raise DataError(f"--domain-text {spec} has no {field!r} column (columns: {rows.column_names})")
        docs = [str(r[field]).strip() for r in rows if r[field] and str(r[field]).strip()]
    else:
        docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(docs) < 2:
        raise DataError(f"--domain-text {spec} has {len(docs)} document(s); it needs at least 2 (one held out "
                        "to measure the span-corruption loss)")
    return docs


def sentinel_ids(tokenizer) -> list[int]:
    """T5's <extra_id_i> tokens, in order; an error when the tokenizer has none."""
    ids = []
    while True:
        i = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")
        if i is None or i == tokenizer.unk_token_id:
            break
        ids.append(i)
    if len(ids) < 2:
        raise TrainConfigError("--recipe adaptive needs a T5 tokenizer with sentinel tokens <extra_id_0>, "
                               "<extra_id_1>, ... for span corruption; this base's tokenizer has none")
    return ids


def _composition(total: int, parts: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input, target) for one document's tokens (without EOS): spans -> sentinels, target = sentinel + span."""
    n = len(ids)
    n_noise = min(max(1, round(n * NOISE_DENSITY)), n - 1)
    n_spans = max(1, min(round(n_noise / MEAN_SPAN), n_noise, n - n_noise, len(sentinels) - 1))
    noise, keep = _composition(n_noise, n_spans, rng), _composition(n - n_noise, n_spans, rng)
    inputs, targets, pos = [], [], 0
    for i in range(n_spans):  # T5 starts with kept tokens, then alternates
        inputs += ids[pos:pos + keep[i]]
        pos += keep[i]
        inputs.append(sentinels[i])
        targets += [sentinels[i], *ids[pos:pos + noise[i]]]
        pos += noise[i]
    return inputs + [eos], targets + [sentinels[n_spans], eos]


class AdaptiveRecipe(Recipe):
    name = "adaptive"

    def prepare_model(self, base, device, train, ev, ood):
        c = self.cfg
        self.sentinels = sentinel_ids(base.tokenizer)
        docs = read_domain_text(c.domain_text, c.input_field)
        order = list(range(len(docs)))
        random.Random(c.seed).shuffle(order)
        n_held = max(1, int(len(docs) * HELD_OUT_FRACTION))
        tok = base.tokenizer
        encode = [tok(docs[i], add_special_tokens=False, truncation=True,
                      max_length=c.max_source_length - 1)["input_ids"] for i in order]
        encode = [ids for ids in encode if len(ids) >= 2]
        if len(encode) < 2:
            raise DataError(f"--domain-text {c.domain_text}: fewer than 2 documents have 2 or more tokens")
        self.held, self.docs = encode[:n_held], encode[n_held:]
        rng = random.Random(c.seed + 1)  # one fixed corruption of the held-out documents
        self.held_examples = [span_corrupt(ids, self.sentinels, tok.eos_token_id, rng) for ids in self.held]
        return train, ev, ood

    def held_out_loss(self, model, device, pad_id: int) -> float:
        total, n = 0.0, 0
        model.eval()
        with torch.no_grad():
            for start in range(0, len(self.held_examples), self.cfg.eval_batch_size):
                chunk = self.held_examples[start:start + self.cfg.eval_batch_size]
                b = D.collate(chunk, pad_id)
                loss = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                             labels=b.labels.to(device)).loss
                total, n = total + loss.item() * len(chunk), n + len(chunk)
        return total / max(1, n)

    def before_task(self, trainable, device, tokenizer) -> None:
        """Phase 1: span-corruption steps on the domain documents, through the weights the task trains."""
        from tqdm.auto import tqdm

        c, model, pad = self.cfg, trainable.model, tokenizer.pad_token_id
        steps = adaptive_steps(c)
        params = trainable.parameters()
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        before = self.held_out_loss(model, device, pad)
        rng, t0, losses = random.Random(c.seed + 2), time.perf_counter(), []
        for _ in tqdm(range(steps), desc=f"adaptive {c.name}", unit="step", disable=not c.progress, leave=False):
            model.train()
            docs = [self.docs[rng.randrange(len(self.docs))] for _ in range(c.batch_size)]
            b = D.collate([span_corrupt(ids, self.sentinels, tokenizer.eos_token_id, rng) for ids in docs], pad)
            loss = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                         labels=b.labels.to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        after = self.held_out_loss(model, device, pad)
        every = max(1, math.ceil(steps / 20))
        self.details = {"steps": steps, "objective": "t5_span_corruption", "noise_density": NOISE_DENSITY,
                        "mean_span": MEAN_SPAN, "train_documents": len(self.docs), "held_out_documents": len(self.held),
                        "held_out_loss_before": before, "held_out_loss_after": after,
                        "train_loss_curve": [round(x, 4) for x in losses[::every]],
                        "seconds": time.perf_counter() - t0, "weights": "the task's own trainable weights"}
        if c.progress:
            print(f"adaptive phase: held-out span-corruption loss {before:.3f} -> {after:.3f} ({steps} steps)",
                  flush=True)

    def report(self) -> dict:
        return {"adaptive": self.details}
