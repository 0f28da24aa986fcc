"""`peftserve train sweep --config sweep.yaml`: methods × data sizes (× layer/module selections) per task.

Writes, under the output directory: runs/<run id>/ (each run's adapter + report), results.csv, results.md
(the seed paper's table shape: metric, steps to converge, time, trainable params, peak memory, each also
normalised to full fine-tuning of the same task and data size), plots (PNG) and the method recommendation
per task type and data size computed from the results (recommend.py), and per `compare:` entry a table,
comparison.json and a plot: a combined method against its parts alone (e.g. UniPELT against LoRA, prefix
tuning and a bottleneck adapter). Entries with `recipe: icl` are scored by `peftserve eval` (k-shot
prompts, no training); runs with `eval_ood` sets add the out-of-domain metric and the recipe study's
summary and plots (training/recipes/study.py). Finished runs are reused when a sweep is re-run on the same directory
(resume after an interruption); --overwrite starts afresh.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from training.config import SELECTABLE, TrainConfig
from training.errors import TrainConfigError
from training.recommend import recommend, recommendation_markdown

COLUMNS = ["task", "task_type", "method", "selection", "data_size", "metric_name", "metric", "steps",
           "steps_to_converge", "train_seconds", "trainable_params", "trainable_percent", "peak_memory_mb",
           "grad_optim_mb", "metric_vs_full", "steps_vs_full", "time_vs_full", "params_vs_full", "memory_vs_full",
           "grad_optim_vs_full"]
RECIPE_COLUMNS = ["recipe", "ood_metric", "ood_sets"]  # added when a run uses a recipe or has OOD sets


@dataclass
class SweepResult:
    output: Path
    rows: list[dict]
    table_md: Path
    recommendations: list[dict]
    comparisons: list[dict]


def load_sweep(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"sweep config {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"sweep config {path} is not valid YAML: {e}") from None
    for key in ("tasks", "methods"):
        if not spec.get(key):
            raise TrainConfigError(f"sweep config {path}: '{key}' is missing or empty")
    from training.evaluate import EvalConfig

    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(EvalConfig)}
    for where, entries in (("defaults", [spec.get("defaults") or {}]), ("methods", spec["methods"]),
                           ("selections", spec.get("selections") or []), ("tasks", spec["tasks"])):
        for entry in entries:
            extra = set(entry) - known - {"name", "type", "method", "generated", "rows"}
            if extra:
                raise TrainConfigError(f"sweep config {path}: unknown keys {sorted(extra)} in {where}")
    labels = {m.get("name", m.get("method")) for m in spec["methods"]}
    for entry in spec.get("compare") or []:
        named = [entry.get("method"), *(entry.get("parts") or [])]
        if set(entry) - {"method", "parts"} or not entry.get("parts") or not set(named) <= labels:
            raise TrainConfigError(f"sweep config {path}: every 'compare' entry needs 'method' and 'parts', the "
                                   f"labels of methods in the sweep ({', '.join(sorted(map(str, labels)))}); got {entry}")
    from training.tasks import TASKS

    for task in spec["tasks"]:
        if "name" not in task or not ("train" in task or "generated" in task):
            raise TrainConfigError(f"sweep config {path}: every task needs 'name' and 'train' (or 'generated')")
        if task.get("generated") and task["generated"] not in TASKS:
            raise TrainConfigError(f"sweep config {path}: generated task {task['generated']!r} is not one of "
                                   f"{', '.join(TASKS)}")
        for key in ("train", "eval", "domain_text"):  # paths relative to the YAML file
            task[key] = _relative_to(path, task.get(key))
        task["eval_ood"] = [_named_relative_to(path, s) for s in task.get("eval_ood") or []]
    for entry in spec["methods"]:
        for key in ("domain_text", "context_file"):
            if entry.get(key):
                entry[key] = _relative_to(path, entry[key])
    return spec


def _relative_to(config: Path, value):
    if value and not Path(value).is_absolute() and (config.parent / value).exists():
        return str((config.parent / value).resolve())
    return value


def _named_relative_to(config: Path, spec: str) -> str:
    name, sep, source = str(spec).partition("=")
    return f"{name}={_relative_to(config, source)}" if sep else _relative_to(config, spec)


def plan_runs(spec: dict, output: Path) -> list[tuple[str, dict, TrainConfig]]:
    """(run id, row labels, config) for every cell of the grid; configs validated up front (an `icl` entry's
    config is an EvalConfig)."""
    runs = []
    selections = spec.get("selections") or [{"name": "all"}]
    for task in spec["tasks"]:
        for method in spec["methods"]:
            sels = selections if method.get("method") in SELECTABLE else [{"name": "all"}]
            for sel in sels:
                for size in spec.get("data_sizes") or [None]:
                    labels = {"task": task["name"],
                              "method": method.get("name") or method.get("method") or method.get("recipe"),
                              "selection": sel.get("name", "all"), "data_size": size}
                    run_id = "-".join(str(x) for x in (labels["task"], labels["method"], labels["selection"],
                                                       size or "all"))
                    kw = {**(spec.get("defaults") or {}),
                          **{k: v for k, v in task.items() if k not in ("name", "type", "domain_text")},
                          **{k: v for k, v in method.items() if k != "name"},
                          **{k: v for k, v in sel.items() if k != "name"}}
                    if kw.get("recipe") == "adaptive" and not kw.get("domain_text"):  # the task's own domain text
                        kw["domain_text"] = task.get("domain_text")
                    kw.update(task=task.get("type", kw.get("task", "auto")), max_train_samples=size,
                              output=output / "runs" / run_id, base=spec.get("base"), overwrite=True)
                    try:
                        cfg = _icl_config(kw) if kw.get("recipe") == "icl" else TrainConfig(**kw).validate()
                    except TypeError as e:
                        raise TrainConfigError(f"sweep run {run_id}: {e}") from None
                    runs.append((run_id, labels, cfg))
    return runs


def _icl_config(kw: dict):
    """An `icl` entry: k-shot prompting of the base (or an adapter) through `peftserve eval`, no training."""
    from training.evaluate import EvalConfig

    names = {f.name for f in fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in kw.items() if k in names}).validate()


def run_sweep(config: Path, output: Path | None = None, overwrite: bool = False, progress: bool = True,
              threads: int | None = None) -> SweepResult:
    spec = load_sweep(config)
    output = Path(output or spec.get("output") or Path(config).with_suffix(""))
    if overwrite and output.exists():
        shutil.rmtree(output)
    for task in spec["tasks"]:
        if task.get("generated"):  # tasks generated in code: the sweep runs anywhere, no data files needed
            from training.tasks import write_domain_text, write_ood, write_task

            where, name = output / "data" / task["name"], task.pop("generated")
            train_file, eval_file = write_task(where, name, n_train=task.pop("rows", 400), n_eval=64)
            task.update(train=str(train_file), eval=str(eval_file), input_field="text", target_field="label")
            ood = write_ood(where, name)
            if ood is not None and not task.get("eval_ood"):
                task["eval_ood"] = [f"ood={ood}"]
            task["domain_text"] = task.get("domain_text") or str(write_domain_text(where, name))
    runs = plan_runs(spec, output)
    from tqdm.auto import tqdm

    from training.train import train

    rows = []
    bar = tqdm(runs, desc=f"sweep {Path(config).name}", unit="run", disable=not progress)
    for run_id, labels, cfg in bar:
        bar.set_postfix_str(run_id)
        icl = not isinstance(cfg, TrainConfig)
        report_file = cfg.output / ("eval_report.json" if icl else "train_report.json")
        if report_file.exists():  # finished in an earlier, interrupted sweep
            report = json.loads(report_file.read_text())
        else:
            cfg.progress, cfg.threads = progress, threads or cfg.threads
            if icl:
                from training.evaluate import run_eval

                report = run_eval(cfg)
            else:
                report = train(cfg).report
        rows.append(row_from_report(labels, report))
    normalise(rows)
    return write_results(output, rows, spec.get("compare") or [])


def row_from_report(labels: dict, r: dict) -> dict:
    """One table row. The metric is the in-domain one (a pattern run's label accuracy), the OOD metric the mean
    over the run's --eval-ood sets (None without)."""
    final = r.get("in_domain_metrics") or r["final_metrics"]
    ood = r.get("ood_metrics") or {}
    return {**labels, "task_type": r["task"], "metric_name": final["metric"], "metric": final["value"],
            "recipe": r.get("recipe", "vanilla"), "trained_method": r["method"],
            "ood_metric": sum(m["value"] for m in ood.values()) / len(ood) if ood else None,
            "ood_sets": ",".join(ood) or None,
            "steps": r["steps"], "steps_to_converge": r["steps_to_converge"],
            "train_seconds": r["train_seconds"], "trainable_params": r["trainable_params"],
            "trainable_percent": r["trainable_percent"], "peak_memory_mb": r["peak_memory_bytes"] / 2**20,
            "grad_optim_mb": r.get("grad_optimizer_bytes", 0) / 2**20}


def normalise(rows: list[dict]) -> None:
    """Add *_vs_full: each quantity divided by full fine-tuning's on the same task and data size."""
    full = {(r["task"], r["data_size"]): r for r in rows if r["method"] == "full"}
    pairs = {"metric_vs_full": "metric", "steps_vs_full": "steps_to_converge", "time_vs_full": "train_seconds",
             "params_vs_full": "trainable_params", "memory_vs_full": "peak_memory_mb",
             "grad_optim_vs_full": "grad_optim_mb"}
    for r in rows:
        ref = full.get((r["task"], r["data_size"]))
        for key, src in pairs.items():
            num, den = r.get(src), ref.get(src) if ref else None
            r[key] = (num / den) if (num is not None and den) else None


def compare(rows: list[dict], method: str, parts: list[str]) -> list[dict]:
    """Per task and data size: `method`'s metric, each part's alone, the best part and method / best
    (above 1: the combination beats every part). Rows over all layers only; cells a run is missing for: None."""
    metric = {(r["task"], r["data_size"], r["method"]): r["metric"] for r in rows if r["selection"] == "all"}
    names = {r["task"]: r.get("metric_name") for r in rows}
    out = []
    for task, size in dict.fromkeys((r["task"], r["data_size"]) for r in rows):
        if (task, size, method) not in metric:
            continue
        alone = {p: metric.get((task, size, p)) for p in parts}
        ran = {p: v for p, v in alone.items() if v is not None}
        best = max(ran, key=ran.get) if ran else None
        value = metric[(task, size, method)]
        out.append({"task": task, "data_size": size, "metric_name": names.get(task), "method": method,
                    "metric": value, "parts": alone,
                    "best_part": best, "best_part_metric": ran.get(best),
                    "vs_best": value / ran[best] if best is not None and ran[best] else None})
    return out


def write_results(output: Path, rows: list[dict], comparisons: list[dict] = ()) -> SweepResult:
    output.mkdir(parents=True, exist_ok=True)
    study = is_recipe_study(rows)
    columns = COLUMNS[:7] + RECIPE_COLUMNS + COLUMNS[7:] if study else COLUMNS
    with open(output / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})
    recs = recommend(rows)
    (output / "recommendation.json").write_text(json.dumps(recs, indent=2) + "\n")
    compared = [{**c, "rows": compare(rows, c["method"], c["parts"])} for c in comparisons]
    if compared:
        (output / "comparison.json").write_text(json.dumps(compared, indent=2) + "\n")
    md = output / "results.md"
    md.write_text(results_markdown(rows) + "\n" + "".join(map(comparison_markdown, compared))
                  + recommendation_markdown(recs))
    from training.plots import plot_comparison, plot_sweep

    plot_sweep(rows, output)
    for c in compared:
        plot_comparison(c, output)
    if study:
        from training.recipes.study import write_study

        write_study(rows, output)
    return SweepResult(output, rows, md, recs, compared)


def is_recipe_study(rows: list[dict]) -> bool:
    return any(r.get("ood_metric") is not None or r.get("recipe", "vanilla") != "vanilla" for r in rows)


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def results_markdown(rows: list[dict]) -> str:
    """One table per task: a row per method × selection × data size, every quantity and its ratio to full."""
    out = ["# Sweep results", "",
           "Ratios are to full fine-tuning on the same task and data size (metric: higher is better; "
           "steps, time, params, memory: lower is better). Steps = steps to reach 97% of the run's best. "
           "Peak MiB: CUDA max allocated on GPU, the process's peak RSS on CPU (libraries included); "
           "grad+optim MiB: gradients and AdamW moments of the trained tensors, what each method adds.", ""]
    ood = any(r.get("ood_metric") is not None for r in rows)  # the recipe study: OOD next to in-domain
    for task in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == task]
        out += [f"## {task} ({sub[0]['task_type']}, {sub[0]['metric_name']})", "",
                "| method | selection | train rows | metric | " + ("OOD metric | " if ood else "") + "×full | steps "
                "| ×full | time s | ×full | trainable params | % | ×full | peak MiB | ×full | grad+optim MiB | ×full |",
                "| --- | --- | ---: | ---: | " + ("---: | " if ood else "") + "---: | ---: | ---: | ---: | ---: | ---: "
                "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sub:
            out.append("| " + " | ".join(_fmt(x) for x in (
                r["method"], r["selection"], r["data_size"] or "all", r["metric"],
                *([r.get("ood_metric")] if ood else []), r["metric_vs_full"],
                r["steps_to_converge"], r["steps_vs_full"], r["train_seconds"], r["time_vs_full"],
                r["trainable_params"], r["trainable_percent"], r["params_vs_full"], r["peak_memory_mb"],
                r["memory_vs_full"], r["grad_optim_mb"], r["grad_optim_vs_full"])) + " |")
        out.append("")
    return "\n".join(out)


def comparison_markdown(c: dict) -> str:
    """One table: per task and data size, the method, each part alone, the best part and method / best."""
    method, parts = c["method"], c["parts"]
    out = [f"## {method} vs its parts alone", "",
           f"{method} against {', '.join(parts)}, each trained alone on the same task and data size (all layers). "
           f"×best = {method}'s metric / the best part's: above 1, the combination beats every part.", "",
           "| task | train rows | " + " | ".join((method, *parts)) + " | best part | ×best |",
           "| --- | ---: | " + " | ".join("---:" for _ in range(len(parts) + 1)) + " | --- | ---: |"]
    for r in c["rows"]:
        cells = (r["task"], r["data_size"] or "all", r["metric"], *(r["parts"][p] for p in parts), r["best_part"],
                 r["vs_best"])
        out.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    return "\n".join(out) + "\n\n"
