"""`peftserve train` end to end: help, errors, overwrite, interrupt safety, register failure, a tiny sweep."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serve.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_both_forms(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("sweep", "--method", "--layers", "--module-groups", "--prompt-submodules", "--register",
                   "--max-train-samples", "--template", "--overwrite", "dora", "adalora", "ptuning",
                   "--adalora-init-r", "--adalora-target-r", "--ptuning-encoder", "--ptuning-hidden-size",
                   "prefix", "--prefix-projection", "--prefix-hidden-size"):
        assert needle in text


@pytest.mark.parametrize("argv, message", [
    (["train", "--train", "x.jsonl", "--output", "o"], "missing --method"),
    (["train", "sweep"], "needs --config"),
    (["train", "--method", "lora", "--train", "nope.jsonl", "--output", "{out}"], "does not exist"),
    (["train", "--method", "lora", "--lora-rank", "0", "--train", "x.jsonl", "--output", "{out}"], "--lora-rank"),
])
def test_bad_input_exits_1_with_a_message(argv, message, tmp_path, capsys):
    argv = [a.replace("{out}", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--method", "lora", "--adalora-init-r", "16"], "--adalora-init-r applies to --method adalora only"),
    (["--method", "dora", "--adalora-target-r", "4"], "--adalora-target-r applies to --method adalora only"),
    (["--method", "adalora", "--lora-rank", "12"], "target rank must be below the initial rank"),
    (["--method", "adalora", "--adalora-init-r", "4", "--adalora-target-r", "6"], "raise --adalora-init-r"),
    (["--method", "adalora", "--adalora-init-r", "0"], "--adalora-init-r must be in"),
    (["--method", "adalora", "--max-steps", "1"], "--method adalora needs --max-steps >= 2"),
    (["--method", "ia3", "--ptuning-encoder", "mlp"], "--ptuning-encoder applies to --method ptuning only"),
    (["--method", "prompt", "--ptuning-hidden-size", "64"], "--ptuning-hidden-size applies to --method ptuning"),
    (["--method", "ptuning", "--ptuning-encoder", "gru"], "--ptuning-encoder must be MLP or LSTM, got 'GRU'"),
    (["--method", "ptuning", "--ptuning-hidden-size", "0"], "--ptuning-hidden-size must be in"),
    (["--method", "ptuning", "--layers", "last:1"], "do not apply to --method ptuning"),
    (["--method", "ptuning", "--prompt-init", "text", "--prompt-init-text", "loud or calm"],
     "--prompt-init text applies to --method prompt only"),
    (["--method", "dora", "--prompt-submodules", "2"], "--prompt-submodules applies to --method prompt or ptuning"),
    (["--method", "adalora", "--target-modules", "q,nope"], "unknown target module"),
    (["--method", "lora", "--prefix-projection"], "--prefix-projection applies to --method prefix only"),
    (["--method", "prefix", "--prefix-hidden-size", "64"],
     "--prefix-hidden-size applies to --method prefix with --prefix-projection only"),
    (["--method", "ptuning", "--prefix-hidden-size", "64"], "--prefix-hidden-size applies to --method prefix"),
    (["--method", "prefix", "--prefix-projection", "--prefix-hidden-size", "0"], "--prefix-hidden-size must be in"),
    (["--method", "prefix", "--num-virtual-tokens", "0"], "--num-virtual-tokens must be in"),
    (["--method", "prefix", "--layers", "last:1"], "do not apply to --method prefix"),
    (["--method", "prefix", "--module-groups", "decoder"], "do not apply to --method prefix"),
    (["--method", "prefix", "--prompt-submodules", "2"], "--prompt-submodules applies to --method prompt or ptuning"),
    (["--method", "prefix", "--prompt-init", "text", "--prompt-init-text", "loud or calm"],
     "--prompt-init text applies to --method prompt only"),
])
def test_bad_new_method_flags_exit_1_with_one_line(flags, message, tmp_path, capsys):
    """Checked before any data or base is read (the --train file does not even exist)."""
    assert main(["train", *flags, "--train", "x.jsonl", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_adalora_too_few_planned_steps_fails_before_the_base_loads(task_files, tmp_path, capsys):
    # 1 row, batch 8, 1 epoch -> 1 planned step: AdaLoRA's schedule needs 2
    assert main(["train", "--method", "adalora", "--train", str(task_files[0]), "--eval", str(task_files[1]),
                 "--task", "generation", "--input-field", "text",
                 "--target-field", "label", "--max-train-samples", "2", "--epochs", "1", "--base", "/nonexistent",
                 "--output", str(tmp_path / "out")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (datasets' bars aside)
    assert len(errors) == 1 and "adalora needs at least 2 optimizer steps, this run plans 1" in errors[0]


def test_overwrite_replaces_and_register_failure_keeps_the_adapter(task_files, tiny_base_dir, tmp_path, capsys):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "old.txt").write_text("old")
    common = ["train", "--method", "bitfit", "--base", str(tiny_base_dir), "--train", str(task_files[0]),
              "--eval", str(task_files[1]), "--input-field", "text", "--target-field", "label",
              "--max-steps", "2", "--max-eval-samples", "8", "--output", str(out), "--quiet"]
    assert main(common) == 1 and "--overwrite" in capsys.readouterr().err
    # a port nobody listens on: the adapter is saved, the error says how to register it later
    rc = main([*common, "--overwrite", "--register", "http://127.0.0.1:9"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "could not reach" in err and "peftserve register" in err
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "train_report.json").read_text())["steps"] == 2


def test_interrupt_leaves_no_half_written_adapter(task_files, tiny_base_dir, tmp_path):
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "serve.cli", "train", "--method", "lora", "--base", str(tiny_base_dir),
           "--train", str(task_files[0]), "--input-field", "text", "--target-field", "label",
           "--max-steps", "100000", "--eval-every", "100000", "--threads", "1", "--output", str(out)]
    # started as a script's background job would be: SIGINT ignored on entry; the command re-installs it
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    seen = ""
    deadline = time.monotonic() + 240
    while "train lora" not in seen and time.monotonic() < deadline:  # the progress bar shows training started
        seen += proc.stderr.read(1) or ""
        if proc.poll() is not None:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, seen[-2000:]
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]


def test_tiny_sweep_end_to_end(tiny_base_dir, tmp_path):
    spec = yaml.safe_load((ROOT / "training" / "sweeps" / "tiny.yaml").read_text())
    spec.update(base=str(tiny_base_dir), data_sizes=[24, 48])
    spec["defaults"].update(max_steps=6, eval_every=3, max_eval_samples=12)
    spec["methods"] = [m for m in spec["methods"] if m["method"] in ("full", "lora", "bitfit", "prompt")]
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["train", "sweep", "--config", str(config), "--output", str(tmp_path / "res"), "--quiet",
                 "--threads", "1"]) == 0
    res = tmp_path / "res"
    rows = list(csv.DictReader(open(res / "results.csv")))
    # full + lora x 2 selections + bitfit x 2 + prompt, each at 2 data sizes; every cell filled
    assert len(rows) == 12
    assert {(r["method"], r["selection"]) for r in rows} == {("full", "all"), ("lora", "all"), ("lora", "last1-ff"),
                                                           ("bitfit", "all"), ("bitfit", "last1-ff"), ("prompt", "all")}
    for r in rows:
        assert all(r[k] not in ("", None) for k in r), r
    full = [r for r in rows if r["method"] == "full"]
    assert all(float(r["params_vs_full"]) == 1.0 for r in full)
    assert all(float(r["params_vs_full"]) < 0.1 for r in rows if r["method"] != "full")
    md = (res / "results.md").read_text()
    assert md.count("\n| ") >= 12 + 2 and "Recommended method" in md and "—" not in md
    recs = json.loads((res / "recommendation.json").read_text())
    assert {(r["task_type"], r["data_size"]) for r in recs} == {("classification", 24), ("classification", 48)}
    assert all(r["recommended"] in {"full", "lora", "bitfit", "prompt", "lora (last1-ff)", "bitfit (last1-ff)"}
               for r in recs)
    for png in ("metric_by_data_size.png", "normalized_to_full.png"):
        assert (res / png).read_bytes()[:4] == b"\x89PNG"
    # re-running on the same directory reuses finished runs (resume after an interruption)
    t0 = time.perf_counter()
    assert main(["train", "sweep", "--config", str(config), "--output", str(res), "--quiet"]) == 0
    assert time.perf_counter() - t0 < 60
    assert list(csv.DictReader(open(res / "results.csv"))) == rows


def test_tiny_sweep_with_dora_adalora_ptuning_prefix(tiny_base_dir, tmp_path):
    """The new methods run through the sweep: dora/adalora take the layer/module selections, ptuning and
    prefix not."""
    spec = yaml.safe_load((ROOT / "training" / "sweeps" / "tiny.yaml").read_text())
    spec.update(base=str(tiny_base_dir), data_sizes=[24])
    spec["defaults"].update(max_steps=4, eval_every=4, max_eval_samples=8)
    spec["methods"] = [m for m in spec["methods"] if m["method"] in ("full", "dora", "adalora", "ptuning", "prefix")]
    assert len(spec["methods"]) == 5, "tiny.yaml lists dora, adalora, ptuning and prefix"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["train", "sweep", "--config", str(config), "--output", str(tmp_path / "res"), "--quiet",
                 "--threads", "1"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "res" / "results.csv")))
    assert {(r["method"], r["selection"]) for r in rows} == {
        ("full", "all"), ("dora", "all"), ("dora", "last1-ff"), ("adalora", "all"), ("adalora", "last1-ff"),
        ("ptuning", "all"), ("prefix", "all")}
    for r in rows:
        assert all(r[k] not in ("", None) for k in r), r
    assert all(float(r["params_vs_full"]) < 0.2 for r in rows if r["method"] != "full")
    ada = json.loads((tmp_path / "res" / "runs" / "loudness-adalora-last1-ff-24" / "adapter_config.json").read_text())
    assert ada["peft_type"] == "ADALORA" and ada["total_step"] == 4
    prefix = json.loads((tmp_path / "res" / "runs" / "loudness-prefix-all-24" / "adapter_config.json").read_text())
    assert prefix["peft_type"] == "PREFIX_TUNING" and prefix["token_dim"] == 4 * 32
    assert sorted(ada["target_modules"]) == ["decoder.block.3.layer.2.DenseReluDense.wi_0",
                                             "decoder.block.3.layer.2.DenseReluDense.wi_1",
                                             "decoder.block.3.layer.2.DenseReluDense.wo",
                                             "encoder.block.3.layer.1.DenseReluDense.wi_0",
                                             "encoder.block.3.layer.1.DenseReluDense.wi_1",
                                             "encoder.block.3.layer.1.DenseReluDense.wo"]


def test_seed_paper_sweep_config_plans_every_cell(shared_data, tmp_path):
    from training.sweep import load_sweep, plan_runs

    spec = load_sweep(ROOT / "training" / "sweeps" / "seed_paper.yaml")
    runs = plan_runs(spec, tmp_path)
    # 3 tasks x (full + prompt + 3 selectable methods x 4 selections) x 4 data sizes
    assert len(runs) == 3 * (2 + 3 * 4) * 4
    assert all(Path(cfg.train).is_file() and Path(cfg.eval).is_file() for _, _, cfg in runs)
    assert {cfg.task for _, _, cfg in runs} == {"classification", "generation"}


@pytest.mark.parametrize("argv, named", [
    (["train", "--recipes", "x"], "unrecognized option: --recipes"),
    (["train", "--method", "lora", "--lora-rnk", "4"], "unrecognized option: --lora-rnk"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_unknown_option_is_named(argv, named, capsys):
    """Not "argument action: invalid choice: 'x'": the option the user mistyped is the one reported."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "invalid choice" not in err
