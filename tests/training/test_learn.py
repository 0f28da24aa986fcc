"""Each kind learns a generated task on the untrained embedded base, and writes what the server loads."""

from __future__ import annotations

import json

import pytest

from tests.training.conftest import KINDS, THRESHOLD

# what the server names the method each kind trains (adapters.kinds.METHODS); served as spec.kind
SERVED = {"dora": ("lora", "dora"), "adalora": ("lora", "adalora"), "ptuning": ("prompt", "p_tuning")}


@pytest.mark.parametrize("kind", KINDS)
def test_kind_learns_the_task_and_writes_a_servable_adapter(kind, trained, tiny_base):
    from adapters import AdapterLimits, BaseDescription, inspect_adapter, load_adapter

    result = trained[kind]
    report = json.loads((result.output / "train_report.json").read_text())
    assert report["final_metrics"]["metric"] == "exact_match"
    assert report["final_metrics"]["value"] >= THRESHOLD[kind], report["final_metrics"]
    assert 0 < report["trainable_params"] < report["base_params"]
    assert report["trainable_percent"] == pytest.approx(100 * report["trainable_params"] / report["base_params"])
    assert report["base"]["fingerprint"] == tiny_base.fingerprint
    assert report["peak_memory_bytes"] > 0 and report["train_seconds"] > 0
    assert report["steps"] <= report["planned_steps"]
    curve = (result.output / "curve.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,loss,eval_loss,metric,wall_s" and len(curve) >= 2
    assert "exact_match" in (result.output / "README.md").read_text()
    # the server's own validation and loader accept it as-is
    base = BaseDescription.from_model(tiny_base.model, tiny_base.name, tiny_base.fingerprint)
    spec = inspect_adapter(result.output, base, AdapterLimits())
    assert (spec.kind.value, spec.method_name) == SERVED.get(kind, (kind, kind))
    # the adapter directory holds what every kind writes: the adapter, report, curve and model card
    assert sorted(p.name for p in result.output.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "curve.csv", "train_report.json"]
    weights = load_adapter(result.output, base, AdapterLimits())
    assert weights.nbytes > 0
    assert not list(result.output.parent.glob(f".{kind}.partial-*")), "staging directory left behind"


def test_bitfit_leaves_bias_free_linears_and_saves_every_target(trained, tiny_base):
    from safetensors import safe_open

    out = trained["bitfit"].output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["base_model_name_or_path"] == tiny_base.name
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("base_model.model.") and k.endswith(".bias") for k in keys)
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in keys), "biases never moved from zero"
    linears = [n for n, m in tiny_base.model.named_modules() if n.endswith((".q", ".wo")) and ".block." in n]
    assert len(keys) == len([n for n, m in tiny_base.model.named_modules()
                             if ".block." in n and n.rsplit(".", 1)[1] in {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}])
    assert all(tiny_base.model.get_submodule(n).bias is None for n in linears)


def test_early_stopping_on_a_flat_eval_metric(task_files, tiny_base_dir, tmp_path):
    from tests.training.conftest import kind_config
    from training.train import train

    # a learning rate too small to move anything: metric and eval loss stay flat -> stop after patience evals
    cfg = kind_config("bitfit", task_files, tiny_base_dir, tmp_path / "flat", learning_rate=1e-9, max_steps=100,
                      eval_every=2, patience=2, stop_at_metric=None, max_eval_samples=8)
    report = train(cfg).report
    assert report["steps"] == 6 and report["planned_steps"] == 100 and report["best_step"] == 2
    assert report["steps_to_converge"] == 2
