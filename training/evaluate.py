"""`peftserve eval`: score the base with k-shot prompts (in-context learning, no training), or an existing
adapter, on in-domain and out-of-domain sets, with the metrics and report format of a training run.

Generation goes through the serving engine (serve.engine), greedy, so an adapter is scored exactly as the
server serves it, for every kind it serves. An adapter that records an input pattern (pattern-based
fine-tuning) gets the pattern applied to each source and its words mapped back to labels, as the server does.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training import data as D
from training.errors import TrainConfigError
from training.icl import build_prompt, draw_shots
from training.recipes.options import parse_ood

ENGINE_CHUNK = 256  # requests handed to the engine at once (its queue bound is larger)


@dataclass
class EvalConfig:
    eval: str
    output: Path | None = None
    base: str | None = None
    adapter: str | None = None
    train: str | None = None  # the demonstrations' pool (with --shots)
    shots: int = 0
    input_field: str = "input"
    target_field: str = "target"
    template: str | None = None
    task: str = "auto"
    eval_ood: list[str] = field(default_factory=list)
    max_train_samples: int | None = None
    max_eval_samples: int | None = 200
    max_target_length: int = 64
    seed: int = 0
    overwrite: bool = False
    threads: int | None = None
    progress: bool = True
    name: str | None = None

    def validate(self) -> EvalConfig:
        if isinstance(self.eval_ood, str):
            self.eval_ood = [self.eval_ood]
        parse_ood(self.eval_ood)
        if not isinstance(self.shots, int) or self.shots < 0:
            raise TrainConfigError(f"--shots must be a whole number >= 0, got {self.shots!r}")
        if self.shots and not self.train:
            raise TrainConfigError("--shots K draws the demonstrations from --train FILE; give --train")
        if self.adapter is not None and not (Path(self.adapter).expanduser() / "adapter_config.json").is_file():
            raise TrainConfigError(f"--adapter {self.adapter} is not an adapter directory (no adapter_config.json)")
        if self.output is not None:
            from training.config import check_output_dir

            self.output = Path(self.output)
            check_output_dir(self.output, self.overwrite)
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "output": str(self.output) if self.output else None}


def run_eval(cfg: EvalConfig) -> dict:
    """Score, write eval_report.json under cfg.output (if given), return the report."""
    import torch

    from serve.engine import Engine, EngineConfig
    from training import output

    cfg.validate()
    load = lambda spec, n, split: D.load_pairs(spec, cfg.input_field, cfg.target_field,  # noqa: E731
                                              cfg.template, n, cfg.seed, split=split)
    ev = load(cfg.eval, cfg.max_eval_samples, "validation")
    ood = {name: load(src, cfg.max_eval_samples, "validation") for name, src in parse_ood(cfg.eval_ood).items()}
    pool = load(cfg.train, cfg.max_train_samples, "train") if cfg.train else None
    shots = draw_shots(pool.sources, pool.targets, cfg.shots, cfg.seed, cfg.train) if cfg.shots else []
    task = D.infer_task(pool or ev, cfg.task)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    memory = output.PeakMemory(torch.device("cpu"))
    t0 = time.perf_counter()
    engine = None
    try:
        # characters bound tokens from above (ByT5: one per byte, +slack for a pattern); the engine refuses longer
        longest = max(len(build_prompt(shots, x)) for p in (ev, *ood.values()) for x in p.sources)
        engine = Engine.from_config(EngineConfig(base=cfg.base, max_new_tokens_cap=max(cfg.max_target_length, 1),
                                                 max_input_tokens=max(512, 2 * longest + 256)))
        pattern = None
        if cfg.adapter is not None:
            spec = engine.register_adapter("evaluated", cfg.adapter)
            if spec.input_pattern:
                from adapters.pattern import InputPattern

                pattern = InputPattern.from_dict(spec.input_pattern)
        scorer = Scorer(engine, "evaluated" if cfg.adapter else None, shots, pattern, task, cfg.max_target_length)
        in_domain = scorer.score(ev)
        ood_metrics = {name: scorer.score(pairs) for name, pairs in ood.items()}
        base_info = engine.info()
        fingerprint = engine.base_desc.fingerprint
    finally:
        if engine is not None:
            engine.close()
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t0
    peak, peak_kind = memory.read()
    trained = _train_report(cfg.adapter)
    report = {
        "name": cfg.name or (Path(cfg.adapter).name if cfg.adapter else f"icl-{cfg.shots}shot"),
        "method": trained.get("method", "adapter") if cfg.adapter else "icl",
        "recipe": "icl" if cfg.adapter is None else "eval", "task": task,
        "shots": len(shots), "prompt_example": scorer.prompt(ev.sources[0]),
        "trainable_params": 0, "base_params": trained.get("base_params"), "trainable_percent": 0.0,
        "adapter_trainable_params": trained.get("trainable_params"),
        "steps": 0, "planned_steps": 0, "epochs": 0.0, "best_step": 0, "steps_to_converge": None,
        "train_seconds": 0.0, "eval_seconds": seconds, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "grad_optimizer_bytes": 0,
        "final_metrics": {"metric": in_domain["metric"], "value": in_domain["value"], "eval_rows": len(ev)},
        "in_domain_metrics": in_domain, "ood_metrics": ood_metrics,
        "input_pattern": pattern.to_dict() if pattern else None,
        "data": {"train_rows": len(pool) if pool else 0, "eval_rows": len(ev)},
        "base": {"name": base_info.get("base"), "fingerprint": fingerprint},
        "device": "cpu", "environment": output.environment(), "config": cfg.to_dict(),
    }
    if cfg.output is not None:
        with output.staged_output(cfg.output, cfg.overwrite) as tmp:
            (tmp / "eval_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


class Scorer:
    """Prompts (demonstrations + pattern), greedy generation through the engine, the task's metric."""

    def __init__(self, engine, adapter, shots, pattern, task: str, max_new_tokens: int):
        self.engine, self.adapter, self.pattern, self.task = engine, adapter, pattern, task
        self.max_new_tokens = max_new_tokens
        fill = pattern.apply if pattern else (lambda s: s)
        word = pattern.word if pattern else (lambda t: t)
        self.shots = [(fill(s), word(t)) for s, t in shots]
        self.fill = fill

    def prompt(self, source: str) -> str:
        return build_prompt(self.shots, self.fill(source))

    def generate(self, sources: list[str]) -> list[str]:
        from serve.engine import GenerationParams, GenerationRequest

        params = GenerationParams(max_new_tokens=self.max_new_tokens, do_sample=False)
        out = []
        for start in range(0, len(sources), ENGINE_CHUNK):
            requests = [GenerationRequest(inputs=self.prompt(s), adapter=self.adapter, params=params)
                        for s in sources[start:start + ENGINE_CHUNK]]
            out += [r.text.strip() for r in self.engine.generate(requests)]
        return out

    def score(self, pairs: D.TextPairs) -> dict:
        from training.metrics import score

        predictions = self.generate(pairs.sources)
        if self.pattern is not None:
            from training.recipes.pattern import label_accuracy

            return label_accuracy(self.pattern, predictions, pairs.targets)
        metric, value = score(self.task, predictions, pairs.targets)
        return {"metric": metric, "value": value, "rows": len(pairs)}


def _train_report(adapter: str | None) -> dict:
    path = Path(adapter).expanduser() / "train_report.json" if adapter else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}
