"""The recipe study as one command: the tiny config on the embedded base writes the seed's table shape
(in-domain and OOD metric, trainable params, peak memory, time), plots and a summary computed from the rows;
the real study config (seed_001.yaml) plans every cell on the shared CoLA data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_study_writes_table_plots_and_computed_summary(tiny_base_dir, tmp_path):
    from serve.cli import main

    spec = yaml.safe_load((ROOT / "training" / "sweeps" / "study_tiny.yaml").read_text())
    spec["base"] = str(tiny_base_dir)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "res"
    assert main(["train", "sweep", "--config", str(config), "--output", str(out), "--quiet", "--threads", "1"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"]: r["recipe"] for r in rows} == {
        "full": "vanilla", "lora": "vanilla", "pbft-lora": "pattern", "adaptive-lora": "adaptive",
        "distill-lora-2shot": "distill", "icl-0shot": "icl", "icl-2shot": "icl"}
    for r in rows:  # the seed's columns, every one filled
        for key in ("metric", "ood_metric", "trainable_params", "peak_memory_mb", "train_seconds"):
            assert r[key] not in ("", None), (r["method"], key)
        assert r["ood_sets"] == "ood"
    assert {r["method"] for r in rows if r["trainable_params"] == "0"} == {"icl-0shot", "icl-2shot"}
    runs = out / "runs"
    pbft = json.loads((runs / "color-pbft-lora-all-16" / "adapter_config.json").read_text())
    assert pbft["peftserve_input_pattern"]["verbalizer"] == {"warm": "yes", "cool": "no"}
    icl = json.loads((runs / "color-icl-2shot-all-16" / "eval_report.json").read_text())
    assert icl["shots"] == 2 and icl["prompt_example"].count("\n\n") == 2
    study = json.loads((out / "study.json").read_text())["summary"]
    assert len(study) == 1 and study[0]["data_size"] == 16
    metric = {r["method"]: float(r["metric"]) for r in rows}
    assert study[0]["best_in_domain"]["value"] == max(metric.values())
    findings = {f["finding"]: f for f in study[0]["findings"]}
    assert {"context distillation vs full fine-tuning, out of domain",
            "pattern-based vs vanilla fine-tuning of the same method, out of domain",
            "in-context learning vs the best trained entry, in domain"} <= set(findings)
    assert "| metric | OOD metric | ×full |" in (out / "results.md").read_text()
    md = (out / "study.md").read_text()
    for f in findings.values():
        assert f["sentence"] in md
    for png in ("study_in_vs_ood.png", "study_ood_by_size.png", "metric_by_data_size.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_summary_verdicts_follow_the_numbers():
    from training.recipes.study import summarise

    def row(method, recipe, trained, metric, ood):
        return {"task": "t", "data_size": 16, "selection": "all", "method": method, "recipe": recipe,
                "trained_method": trained, "metric": metric, "ood_metric": ood}

    def verdicts(distill_ood, pbft_ood):
        rows = [row("full", "vanilla", "full", 0.8, 0.6), row("lora", "vanilla", "lora", 0.78, 0.55),
                row("distill", "distill", "lora", 0.7, distill_ood), row("pbft", "pattern", "lora", 0.8, pbft_ood)]
        return {f["finding"].split(",")[0]: f["verdict"] for f in summarise(rows)[0]["findings"]}

    assert verdicts(0.7, 0.4)["context distillation vs full fine-tuning"] == "beats"
    assert verdicts(0.5, 0.4)["context distillation vs full fine-tuning"] == "trails"
    assert verdicts(0.6, 0.4)["context distillation vs full fine-tuning"] == "matches"
    assert verdicts(0.6, 0.4)["pattern-based vs vanilla fine-tuning of the same method"] == "trails"
    assert verdicts(0.6, 0.7)["pattern-based vs vanilla fine-tuning of the same method"] == "beats"


def test_seed_001_study_plans_every_cell(shared_data, tmp_path):
    from training.evaluate import EvalConfig
    from training.sweep import load_sweep, plan_runs

    spec = load_sweep(ROOT / "training" / "sweeps" / "seed_001.yaml")
    runs = plan_runs(spec, tmp_path)
    assert len(runs) == 10 * 3  # entries x few-shot sizes 16/64/256
    assert {labels["data_size"] for _, labels, _ in runs} == {16, 64, 256}
    for _, labels, cfg in runs:
        assert Path(cfg.train).is_file() and Path(cfg.eval).is_file()
        assert cfg.eval_ood == [f"ood={shared_data / 'cola' / 'ood_dev.jsonl'}"]
        if labels["method"].startswith("adaptive"):
            assert Path(cfg.domain_text).is_file()
    assert sum(isinstance(cfg, EvalConfig) for _, _, cfg in runs) == 2 * 3
