"""AdapterHub-family methods (`--method adapter|ah_prefix|unipelt|mam`, training/adapterhub/): each learns, writes
AdapterHub's layout, and AdapterHub 1.3.0 itself (its own venv) loads the file and decodes the same greedy
tokens, with the same logits, as the trainer's modules. Plus the gate semantics we serve (per position in the
decoder, the masked mean over real tokens in the encoder), the selections and the one-line refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from serve.cli import main
from training.config import TrainConfig

HERE = Path(__file__).resolve().parent
# label -> (method, options): every architecture, and selections that exercise leave_out on both stacks
CASES = {
    "seq_bn": ("adapter", {}),
    "double_seq_bn": ("adapter", {"adapter_arch": "double_seq_bn"}),
    "par_bn": ("adapter", {"adapter_arch": "par_bn"}),
    "ah_prefix": ("ah_prefix", {"num_virtual_tokens": 8}),
    "unipelt": ("unipelt", {}),
    "mam": ("mam", {"num_virtual_tokens": 8}),
    "seq_bn_last1_decoder": ("adapter", {"layers": "last:1", "module_groups": ["decoder"]}),
    "unipelt_first2": ("unipelt", {"layers": "first:2"}),
}
PROMPTS = ["THE SOUP WAS GREAT.", "the soup was great.", "Hello World", "abc DEF ghi jkl"]
NEW_TOKENS = 6


def ah_config(method: str, task, base_dir: Path, out: Path, **options) -> TrainConfig:
    settings = dict(input_field="text", target_field="label", batch_size=16, max_steps=10, eval_every=5, patience=0,
                    max_eval_samples=8, dropout=0.0, seed=0, progress=False, learning_rate=3e-3)
    settings.update(options)
    return TrainConfig(method=method, train=str(task[0]), eval=str(task[1]), output=out, base=str(base_dir),
                       **settings)


@pytest.fixture(scope="module")
def ah_trained(task_files, tiny_base_dir, tmp_path_factory) -> dict:
    """label -> TrainResult: 10 steps each, enough to move every tensor well away from its initialisation."""
    from training.train import train

    root = tmp_path_factory.mktemp("adapterhub")
    return {label: train(ah_config(method, task_files, tiny_base_dir, root / label, **options))
            for label, (method, options) in CASES.items()}


@pytest.fixture(scope="module")
def oracle(ah_trained, tiny_base_dir, tiny_base, tmp_path_factory) -> dict:
    """AdapterHub's own results for every trained adapter (one oracle process)."""
    from tests.adapterhub.oracle_venv import oracle_python

    # the oracle is a real component of this test: a machine that cannot build its venv fails, never skips
    python = oracle_python()
    work = tmp_path_factory.mktemp("oracle")
    job = work / "job.json"
    job.write_text(json.dumps({"base": str(tiny_base_dir), "max_new_tokens": NEW_TOKENS,
                               "adapters": {k: str(r.output) for k, r in ah_trained.items()},
                               "prompts": [tiny_base.tokenizer(t).input_ids for t in PROMPTS]}))
    # outside the repo and without PYTHONPATH: the project's `adapters` package must not shadow AdapterHub's
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([python, str(HERE / "adapterhub_generate.py"), str(job)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def loaded(base_dir: Path, adapter_dir: Path):
    """A fresh base with the saved adapter attached by the trainer's own strict loader."""
    from serve.engine.base import load_base
    from training.adapterhub.layout import load

    base = load_base(str(base_dir))
    load(base.model, adapter_dir)
    return base.model.eval(), base.tokenizer


@pytest.mark.parametrize("label", CASES)
def test_each_method_learns_and_writes_adapterhubs_layout(label, ah_trained, tiny_base):
    result = ah_trained[label]
    out, report = result.output, result.report
    curve = _curve(out)
    assert curve[-1]["loss"] < curve[0]["loss"] and curve[-1]["eval_loss"] < curve[0]["eval_loss"], curve
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors", "adapter_config.json",
                                                     "curve.csv", "train_report.json"]
    body = json.loads((out / "adapter_config.json").read_text())
    assert {k: body[k] for k in ("hidden_size", "model_class", "model_name", "model_type", "name", "version")} == {
        "hidden_size": 128, "model_class": "T5ForConditionalGeneration", "model_name": tiny_base.name,
        "model_type": "t5", "name": label, "version": "adapters.1.3.0"}
    assert body["config"] == report["adapterhub_config"]
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    assert all(f".{label}." in k for k in keys)
    assert numel == report["trainable_params"]  # every trained tensor saved, each shared pool tensor once
    pool = [k for k in keys if ".prefix_tuning.pool." in k]
    assert all(k.startswith("encoder.block.0.layer.0.SelfAttention.") for k in pool)
    assert bool(pool) == (CASES[label][0] != "adapter")
    assert "AdapterHub" in (out / "README.md").read_text()


def _curve(out: Path) -> list[dict]:
    from training.output import read_curve

    return read_curve(out / "curve.csv")


def test_configs_are_adapterhubs_own_defaults(oracle):
    from training.adapterhub import config as ah

    own = oracle["configs"]
    assert ah.BN_ARCHS == {"seq_bn": own["SeqBnConfig"], "double_seq_bn": own["DoubleSeqBnConfig"],
                           "par_bn": own["ParBnConfig"]}
    assert (ah.PREFIX, ah.LORA) == (own["PrefixTuningConfig"], own["LoRAConfig"])
    for method, name in (("unipelt", "UniPELTConfig"), ("mam", "MAMConfig"), ("ah_prefix", "PrefixTuningConfig")):
        assert ah.method_config(TrainConfig(method=method, train="x", output="o")) == own[name], method


@pytest.mark.parametrize("label", CASES)
def test_adapterhub_loads_what_we_trained_and_decodes_the_same(label, oracle, ah_trained, tiny_base_dir):
    theirs = oracle["adapters"][label]
    assert theirs["unexpected"] == []
    # AdapterHub lists the shared prefix pool under every other layer (and the model's own pool) as missing:
    # the file holds it once, which fills the one shared module
    assert all(".prefix_tunings." in k for k in theirs["missing"]), theirs["missing"][:3]
    model, tokenizer = loaded(tiny_base_dir, ah_trained[label].output)
    for text, tokens, scores in zip(PROMPTS, theirs["tokens"], theirs["scores"], strict=True):
        ids = tokenizer([text], return_tensors="pt").input_ids
        with torch.no_grad():
            ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert ours.sequences[0, 1:].tolist() == tokens, (label, text)
        for step, logits in enumerate(scores):
            assert (ours.scores[step][0] - torch.tensor(logits)).abs().max() < 1e-4, (label, text, step)


def test_the_engine_serves_what_we_trained(ah_trained, tiny_base_dir):
    """Every kind registers as the server's adapterhub kind and decodes our tokens, the prompts batched
    together (padded: the server's encoder gates must ignore padding, as ours)."""
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    cfg = EngineConfig(base=str(tiny_base_dir), device_slots={"adapterhub": 2, "lora": 1}, max_batch_rows=16,
                       max_new_tokens_cap=16, max_input_tokens=64, request_timeout_s=120)
    with Engine.from_config(cfg) as engine:
        for label, result in ah_trained.items():
            engine.register_adapter(label, result.output)
            served = engine.generate([GenerationRequest(t, adapter=label, params=GenerationParams(
                max_new_tokens=NEW_TOKENS)) for t in PROMPTS])
            model, tokenizer = loaded(tiny_base_dir, result.output)
            for text, got in zip(PROMPTS, served, strict=True):
                ids = tokenizer([text], return_tensors="pt").input_ids
                with torch.no_grad():
                    ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=NEW_TOKENS, do_sample=False)[0, 1:].tolist()
                assert got.token_ids == ours, (label, text)


def test_decoder_gates_are_per_position_so_greedy_by_forward_is_incremental(ah_trained, tiny_base_dir):
    """Position t's output depends on decoder tokens up to t only (AdapterHub's full-forward gate mean would
    see the future): repeated forwards equal cached generate, the decoding served."""
    from training.greedy import _greedy_by_forward

    model, tokenizer = loaded(tiny_base_dir, ah_trained["unipelt"].output)
    ids = tokenizer(["THE SOUP WAS GREAT."], return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 50, 60, 70]])).logits
        b = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 50, 90, 110]])).logits
        assert torch.equal(a[0, :2], b[0, :2])
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        cached = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert _greedy_by_forward(model, enc, NEW_TOKENS).tolist() == cached.tolist()


@pytest.mark.parametrize("label", ["unipelt", "mam"])
def test_encoder_gates_average_real_tokens_only(label, ah_trained, tiny_base_dir):
    """A row's logits do not depend on the padding a batch adds to it (AdapterHub's mean would include it)."""
    model, tokenizer = loaded(tiny_base_dir, ah_trained[label].output)
    enc = tokenizer(["THE SOUP", "a much longer row of text here"], return_tensors="pt", padding=True)
    alone = tokenizer(["THE SOUP"], return_tensors="pt")
    dec = torch.tensor([[0, 50, 60]])
    with torch.no_grad():
        batched = model(**enc, decoder_input_ids=dec.expand(2, -1)).logits[0]
        single = model(**alone, decoder_input_ids=dec).logits[0]
    assert (batched - single).abs().max() < 1e-5


def test_selections_map_to_leave_out_and_spare_the_prefix():
    from training.adapterhub.config import kind, parts, selected_config

    cfg = TrainConfig(method="unipelt", train="x", output="o", layers="last:1", module_groups=["decoder"])
    by_kind = {kind(p): p for p in parts(selected_config(cfg, 4, 4))}
    assert by_kind["prefix_tuning"]["leave_out"] == []
    assert by_kind["lora"]["leave_out"] == by_kind["bottleneck"]["leave_out"] == [0, 1, 2, 3, 4, 5, 6]
    # attention only: the FFN-placed seq_bn member has nothing left and is dropped; LoRA and prefix stay
    cfg = TrainConfig(method="unipelt", train="x", output="o", module_groups=["attention"])
    assert [kind(p) for p in parts(selected_config(cfg, 4, 4))] == ["prefix_tuning", "lora"]
    cfg = TrainConfig(method="adapter", train="x", output="o", adapter_arch="double_seq_bn",
                      module_groups=["feed-forward"])
    (single,) = parts(selected_config(cfg, 4, 4))
    assert (single["mh_adapter"], single["output_adapter"]) == (False, True)


@pytest.mark.parametrize("flags, message", [
    (["--method", "lora", "--adapter-arch", "par_bn"], "--adapter-arch applies to --method adapter only"),
    (["--method", "ah_prefix", "--reduction-factor", "8"], "--reduction-factor applies to --method adapter, unipelt"),
    (["--method", "adapter", "--reduction-factor", "0"], "--reduction-factor must be in"),
    (["--method", "ah_prefix", "--layers", "last:1"], "do not apply to --method ah_prefix"),
    (["--method", "unipelt", "--target-modules", "q,k"], "do not apply to --method unipelt"),
    (["--method", "mam", "--name", "v1.2"], "contains '.'"),
    (["--method", "adapter", "--prefix-hidden-size", "64"], "--prefix-hidden-size applies to"),
])
def test_bad_adapterhub_flags_exit_1_with_one_line(flags, message, tmp_path, capsys):
    assert main(["train", *flags, "--train", "x.jsonl", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_selection_that_adapts_nothing_fails_before_training(task_files, tiny_base_dir, tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["train", "--method", "adapter", "--module-groups", "attention", "--base", str(tiny_base_dir),
                 "--train", str(task_files[0]), "--input-field", "text", "--target-field", "label",
                 "--output", str(out), "--quiet"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "adapts nothing" in errors[0] and "output_adapter" in errors[0], errors
    assert not out.exists()


def test_help_lists_the_adapterhub_options(capsys):
    from serve.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("adapter", "ah_prefix", "unipelt", "mam", "--adapter-arch", "--reduction-factor", "par_bn"):
        assert needle in text


def test_compare_ratios_against_the_best_part():
    from training.sweep import compare

    rows = [{"task": "t", "data_size": n, "method": m, "selection": "all", "metric": v}
            for n, m, v in ((10, "unipelt", 0.6), (10, "lora", 0.5), (10, "adapter", 0.3),
                            (20, "unipelt", 0.8), (20, "adapter", 1.0))]
    (small, large) = compare(rows, "unipelt", ["lora", "adapter"])
    assert (small["best_part"], small["vs_best"]) == ("lora", pytest.approx(1.2))
    assert large["parts"] == {"lora": None, "adapter": 1.0} and large["vs_best"] == pytest.approx(0.8)


def test_tiny_sweep_compares_unipelt_with_its_parts(tiny_base_dir, tmp_path):
    import yaml

    spec = yaml.safe_load((HERE.parents[1] / "training" / "sweeps" / "unipelt.yaml").read_text())
    tiny = yaml.safe_load((HERE.parents[1] / "training" / "sweeps" / "tiny.yaml").read_text())
    spec.update(base=str(tiny_base_dir), tasks=tiny["tasks"], data_sizes=[24, 48],
                defaults={**tiny["defaults"], "max_steps": 10, "eval_every": 10, "max_eval_samples": 8})
    # a few fast steps that move every method off 0 exact match, so each ×best is a number
    spec["methods"] = [{**m, "learning_rate": 1e-2} for m in spec["methods"] if m["method"] != "full"]
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["train", "sweep", "--config", str(config), "--output", str(tmp_path / "res"), "--quiet",
                 "--threads", "1"]) == 0
    res = tmp_path / "res"
    md = (res / "results.md").read_text()
    section = md.split("## unipelt vs its parts alone", 1)[1].split("\n## ", 1)[0]
    header = "| task | train rows | unipelt | lora | ah_prefix | adapter | best part | ×best |"
    assert header in section
    table = [line for line in section.splitlines() if line.startswith("| loudness |")]
    assert [line.split(" | ")[1] for line in table] == ["24", "48"]
    assert all(float(line.rstrip(" |").rsplit(" | ", 1)[1]) > 0 for line in table), table
    (comparison,) = json.loads((res / "comparison.json").read_text())
    assert comparison["method"] == "unipelt" and len(comparison["rows"]) == 2
    assert (res / "compare_unipelt.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_entries_must_name_methods_of_the_sweep(tmp_path):
    import yaml

    from training.errors import TrainConfigError
    from training.sweep import load_sweep

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"tasks": [{"name": "t", "generated": "loudness"}],
                                      "methods": [{"method": "unipelt"}, {"method": "lora"}],
                                      "compare": [{"method": "unipelt", "parts": ["lora", "adapter"]}]}))
    with pytest.raises(TrainConfigError, match="'compare' entry"):
        load_sweep(config)
