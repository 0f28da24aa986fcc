"""The single training entry: `train(TrainConfig) -> TrainResult`.

Order matters: validate the config, load and check the data, load the base and resolve the layer/module
selection — all before the first optimizer step, so bad input costs nothing. Then a plain torch loop
(AdamW, linear warmup) with periodic greedy-decoding evaluation, early stopping on the eval metric, the
best weights restored, and an atomic write of adapter + report + curve + model card.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import data as D
from training import methods, output
from training.config import ADAPTERHUB_METHODS, SELECTABLE, TrainConfig, adalora_schedule
from training.greedy import generate
from training.metrics import TASK_METRICS, score
from training.recipes import make_recipe
from training.recipes.base import Recipe
from training.recipes.options import parse_ood


@dataclass
class Prepared:
    cfg: TrainConfig
    base: object  # serve.base.LoadedBase
    train: D.TextPairs
    eval: D.TextPairs
    task: str
    device: torch.device
    recipe: Recipe | None = None  # None: vanilla
    ood: dict[str, D.TextPairs] = field(default_factory=dict)  # --eval-ood sets by name


@dataclass
class TrainResult:
    output: Path
    report: dict

    @property
    def metric(self) -> float:
        return self.report["final_metrics"]["value"]


def prepare(cfg: TrainConfig) -> Prepared:
    """Every check that can fail on user input, before any training."""
    from serve.engine import load_base

    cfg.validate()
    recipe = make_recipe(cfg)
    train_pairs = recipe.load(cfg.train, cfg.max_train_samples)
    if cfg.eval:
        eval_pairs = recipe.load(cfg.eval, cfg.max_eval_samples, split="validation")
    else:
        train_pairs, eval_pairs = D.split_eval(train_pairs, seed=cfg.seed)
        if cfg.max_eval_samples:
            eval_pairs = D.TextPairs(eval_pairs.sources[: cfg.max_eval_samples],
                                     eval_pairs.targets[: cfg.max_eval_samples], eval_pairs.source_name)
    ood = {name: recipe.load(source, cfg.max_eval_samples, split="validation")
           for name, source in parse_ood(cfg.eval_ood).items()}
    train_pairs, eval_pairs, ood = recipe.prepare_data(train_pairs, eval_pairs, ood)
    if recipe.needs_targets:  # known before the base loads: say so before loading it
        D.check_labels(train_pairs, D.infer_task(train_pairs, cfg.task))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.method == "adalora":  # its rank schedule needs a few steps; say so before loading the base
        adalora_schedule(plan_steps(cfg, len(train_pairs))[0])
    base = load_base(cfg.base)
    if cfg.method in SELECTABLE:
        methods.select_modules(base.model, cfg)  # raises on an empty/out-of-range selection
    elif cfg.method == "prefix":
        methods.prefix_geometry(base)  # raises on a decoder deeper than the encoder
    elif cfg.method in ADAPTERHUB_METHODS:
        methods.adapterhub_config(cfg, base.model)  # raises on a selection that adapts nothing
    train_pairs, eval_pairs, ood = recipe.prepare_model(base, device, train_pairs, eval_pairs, ood)
    task = recipe.infer_task(train_pairs)
    D.check_labels(train_pairs, task)
    return Prepared(cfg, base, train_pairs, eval_pairs, task, device, recipe, ood)


def eval_loss(model, tokenizer, pairs: D.TextPairs, device, cfg: TrainConfig) -> float:
    """Teacher-forced mean loss on the eval rows: the tie-breaker while the metric is flat."""
    encoded = D.encode_pairs(tokenizer, pairs, cfg.max_source_length, cfg.max_target_length)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), cfg.eval_batch_size):
            chunk = encoded[start:start + cfg.eval_batch_size]
            b = D.collate(chunk, tokenizer.pad_token_id)
            loss = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                         labels=b.labels.to(device)).loss
            total, n = total + loss.item() * len(chunk), n + len(chunk)
    return total / max(1, n)


def evaluate_pairs(model, tokenizer, pairs: D.TextPairs, task: str, device, cfg: TrainConfig) -> tuple[float, list]:
    max_new = min(cfg.max_target_length, max(len(tokenizer(t)["input_ids"]) for t in pairs.targets) + 2)
    preds = generate(model, tokenizer, pairs.sources, device, cfg.max_source_length, max_new, cfg.eval_batch_size)
    return score(task, preds, pairs.targets)[1], preds


def plan_steps(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """(total steps, eval interval)."""
    per_epoch = math.ceil(n_train / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(per_epoch * (cfg.epochs if cfg.epochs is not None else 3)))
    return total, cfg.eval_every or max(1, total // 10)


def train(cfg: TrainConfig, prepared: Prepared | None = None) -> TrainResult:
    p = prepared or prepare(cfg)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, p)
    finally:
        torch.set_num_threads(threads_before)  # the caller's process (e.g. a serving replica) keeps its setting


def _train(cfg: TrainConfig, p: Prepared) -> TrainResult:
    torch.manual_seed(cfg.seed)
    tok = p.base.tokenizer
    recipe = p.recipe or Recipe(cfg)
    n_train = len(p.train)
    total, every = plan_steps(cfg, n_train)
    trainable = methods.build(cfg, p.base, total_steps=total)
    model = trainable.model.to(p.device)
    memory = output.PeakMemory(p.device)
    t0 = time.perf_counter()
    recipe.before_task(trainable, p.device, tok)  # adaptive: span-corruption phase through the same weights
    params = trainable.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    metric_name = TASK_METRICS[p.task][1]
    curve, best, best_loss, best_step, best_state, stale = [], -1.0, float("inf"), 0, None, 0
    best_preds: list[str] = []
    stream = recipe.batches(tok, p.train)
    bar = _progress(total, cfg)
    step, epoch, loss_sum, loss_n = 0, 0, 0.0, 0
    for step in range(1, total + 1):
        model.train()
        epoch, batch = next(stream)
        loss = recipe.loss(model, batch, p.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        trainable.after_optimizer_step(step)  # AdaLoRA: peft's update_and_allocate (gradients still present)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % every and step != total:
            bar.update(1)
            continue
        value, preds = evaluate_pairs(model, tok, p.eval, p.task, p.device, cfg)
        ev_loss = eval_loss(model, tok, p.eval, p.device, cfg)
        curve.append({"step": step, "epoch": round(step * cfg.batch_size / n_train, 4),
                      "loss": loss_sum / loss_n, "eval_loss": ev_loss, "metric": value,
                      "wall_s": round(time.perf_counter() - t0, 3)})
        loss_sum, loss_n = 0.0, 0
        bar.update(1)
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", **{metric_name: f"{value:.3f}"})
        # better: a higher metric, or the same metric at a clearly lower eval loss (still learning)
        if value > best or (value == best and ev_loss < best_loss * 0.99):
            best, best_loss, best_step, stale = value, ev_loss, step, 0
            best_state, best_preds = trainable.snapshot(), preds
        else:
            stale += 1
        if (cfg.stop_at_metric is not None and value >= cfg.stop_at_metric) or (cfg.patience and stale >= cfg.patience):
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    peak, peak_kind = memory.read()
    trainable.restore(best_state)  # the best evaluation's weights: what gets saved and reported
    in_domain = recipe.score(p.task, best_preds, p.eval)
    ood_metrics = {name: recipe.score(p.task, evaluate_pairs(model, tok, pairs, p.task, p.device, cfg)[1], pairs)
                   for name, pairs in p.ood.items()}
    model.to("cpu")
    n_trainable, n_base = trainable.counts()
    report = {
        "name": cfg.name, "method": cfg.method, "task": p.task,
        "targets": sorted({m.rsplit(".", 1)[1] for m in trainable.modules}), "adapted_modules": len(trainable.modules),
        "trainable_params": n_trainable, "base_params": n_base,
        "trainable_percent": 100.0 * n_trainable / max(1, n_base),
        "steps": step, "planned_steps": total, "epochs": step * cfg.batch_size / n_train,
        "best_step": best_step, "steps_to_converge": steps_to_converge(curve),
        "train_seconds": train_seconds, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        # what the method itself adds to memory: gradients + AdamW's two moments of the trained tensors
        "grad_optimizer_bytes": sum(3 * t.numel() * t.element_size() for t in params),
        "final_metrics": {"metric": metric_name, "value": best, "eval_rows": len(p.eval)},
        "recipe": recipe.name, "in_domain_metrics": in_domain, "ood_metrics": ood_metrics,
        "data": {"train_rows": len(p.train), "eval_rows": len(p.eval), "labels": p.train.label_set[:50]
                 if p.task == "classification" else None},
        "base": {"name": p.base.name, "fingerprint": p.base.fingerprint},
        "device": str(p.device), "environment": output.environment(), "config": cfg.to_dict(),
        **trainable.report_details(),
    }
    with output.staged_output(cfg.output, cfg.overwrite) as tmp:
        methods.save(trainable, tmp, p.base)
        recipe.after_save(tmp)
        report.update(recipe.report())
        output.write_curve(tmp / "curve.csv", curve)
        output.write_report(tmp, report)
    if cfg.progress:
        print(f"saved {cfg.method} adapter to {cfg.output}: {metric_name}={best:.4f} after {step} steps "
              f"({train_seconds:.1f} s)", flush=True)
    if cfg.register:
        from training.register import register

        report["registered"] = register(cfg.register, cfg.name, cfg.output, cfg.register_token)
    return TrainResult(cfg.output, report)


def steps_to_converge(curve: list[dict], fraction: float = 0.97) -> int | None:
    """First evaluated step whose metric reaches `fraction` of the run's best (the seed paper's notion)."""
    if not curve:
        return None
    best = max(r["metric"] for r in curve)
    return next(r["step"] for r in curve if r["metric"] >= fraction * best)


def _progress(total: int, cfg: TrainConfig):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"train {cfg.method} {cfg.name}", unit="step", disable=not cfg.progress,
                dynamic_ncols=True, leave=False)
