"""DoRA, AdaLoRA and P-tuning specifics: AdaLoRA's per-step rank allocation and its saved rank_pattern, the
untrained start the learning thresholds are measured against, and what the saved files hold."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.training.conftest import ALL_LINEAR, kind_config

ADA_STEPS = 40  # tinit 4, pruning until step 32 (tfinal 8), then the ranks are fixed


@pytest.fixture(scope="module")
def adalora_run(task_files, tiny_base_dir, tmp_path_factory, monkeypatch_module):
    """A full AdaLoRA schedule (warm-up, pruning, fixed ranks) with a spy on peft's update_and_allocate."""
    from peft.tuners.adalora import AdaLoraModel

    from training.train import train

    calls = []
    original = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        # gradients present = after loss.backward() and before the next zero_grad(set_to_none=True)
        grads = [p.grad is not None for n, p in self.model.named_parameters() if "lora_E" in n]
        calls.append((global_step, bool(grads) and all(grads)))
        return original(self, global_step)

    monkeypatch_module.setattr(AdaLoraModel, "update_and_allocate", spy)
    cfg = kind_config("adalora", task_files, tiny_base_dir, tmp_path_factory.mktemp("ada") / "pruned",
                      max_steps=ADA_STEPS, stop_at_metric=None, lora_rank=4, target_modules=ALL_LINEAR)
    result = train(cfg)
    return result, calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_adalora_allocates_ranks_after_every_backward(adalora_run):
    result, calls = adalora_run
    assert [step for step, _ in calls] == list(range(1, ADA_STEPS + 1))
    assert all(had_grads for _, had_grads in calls), "update_and_allocate ran without the step's gradients"
    assert result.report["steps"] == ADA_STEPS


def test_adalora_saves_a_pruned_rank_pattern_the_server_reads(adalora_run, tiny_base):
    from adapters import AdapterLimits, BaseDescription, inspect_adapter

    result, _ = adalora_run
    out = result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["base_model_name_or_path"] == tiny_base.name
    assert (config["init_r"], config["target_r"]) == (12, 4)
    assert (config["total_step"], config["tinit"], config["tfinal"], config["deltaT"]) == (ADA_STEPS, 4, 8, 1)
    pattern = config["rank_pattern"]
    assert pattern, "no rank_pattern: pruning never happened"
    kept = {key.removesuffix(".lora_E"): sum(mask) for key, mask in pattern.items()}
    assert all(len(mask) == 12 for mask in pattern.values())
    assert 0 < sum(kept.values()) <= 4 * len(kept), "more than the target budget kept after the final allocation"
    assert min(kept.values()) < 12
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:  # tensors cut to the pattern
        for module, rank in kept.items():
            assert f.get_slice(f"base_model.model.{module}.lora_E").get_shape() == [rank, 1]
            assert f.get_slice(f"base_model.model.{module}.lora_A").get_shape()[0] == rank
    base = BaseDescription.from_model(tiny_base.model, tiny_base.name, tiny_base.fingerprint)
    spec = inspect_adapter(out, base, AdapterLimits())
    assert spec.kind.value == "lora" and spec.method_name == "adalora"
    assert spec.options["pruned"] and spec.options["init_r"] == 12
    assert 0 < spec.rank <= 12


def test_pruned_adalora_reloads_as_evaluated_and_serves_like_peft(adalora_run, task_files, tiny_base_dir):
    """The saved (pruned) adapter scores the reported metric when reloaded, and the engine's greedy tokens
    are peft's: the best evaluation's weights and its rank_pattern are saved together."""
    from peft import PeftModel

    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
    from serve.engine.base import load_base
    from training import data
    from training.train import evaluate_pairs

    result, _ = adalora_run
    cfg = kind_config("adalora", task_files, tiny_base_dir, result.output)
    base = load_base(str(tiny_base_dir))
    model = PeftModel.from_pretrained(base.model, str(result.output)).eval()
    pairs = data.load_pairs(cfg.eval, "text", "label", max_samples=cfg.max_eval_samples, split="validation")
    value, _ = evaluate_pairs(model, base.tokenizer, pairs, "classification", torch.device("cpu"), cfg)
    assert value == pytest.approx(result.metric)
    text = "THE SOUP WAS GREAT."
    enc = base.tokenizer([text], return_tensors="pt")
    peft_ids = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=6,
                              do_sample=False, num_beams=1)[0].tolist()
    eng = Engine.from_config(EngineConfig(base=str(tiny_base_dir), max_batch_rows=4, max_new_tokens_cap=8,
                                          max_input_tokens=64, request_timeout_s=120))
    try:
        eng.register_adapter("pruned", result.output)
        (served,) = eng.generate([GenerationRequest(text, adapter="pruned",
                                                    params=GenerationParams(max_new_tokens=6))])
    finally:
        eng.close()
    peft_tokens = [t for t in peft_ids[1:] if t not in (base.tokenizer.pad_token_id,)]
    assert served.token_ids[: len(peft_tokens)] == peft_tokens
    assert served.text.strip() == base.tokenizer.decode(peft_ids, skip_special_tokens=True).strip()


def test_dora_saves_magnitudes_and_the_flag(trained):
    out = trained["dora"].output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    assert sum(k.endswith("lora_A.weight") for k in keys) == sum(k.endswith("lora_magnitude_vector") for k in keys)


def test_ptuning_saves_the_encoder_prompt_only(trained):
    out = trained["ptuning"].output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["num_transformer_submodules"] == 1
    assert config["encoder_reparameterization_type"] == "MLP" and config["encoder_hidden_size"] == 512
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]  # the encoder's output; no MLP weights are shipped
        assert f.get_slice("prompt_embeddings").get_shape() == [20, 128]
    report = json.loads((out / "train_report.json").read_text())
    assert report["trainable_params"] > 20 * 128  # the MLP trains; only its output is saved


def test_the_untrained_start_does_not_solve_the_task(task_files, tiny_base_dir):
    """What test_learn's thresholds improve on: the untrained base (and a fresh adapter of each new kind,
    which starts as the identity or a near-zero prompt) gets ~no eval row right."""
    from serve.engine.base import load_base
    from training import data
    from training.methods import build
    from training.train import evaluate_pairs

    for kind in ("dora", "adalora", "ptuning"):
        cfg = kind_config(kind, task_files, tiny_base_dir, tiny_base_dir.parent / "unused")
        base = load_base(str(tiny_base_dir))
        model = build(cfg, base, total_steps=cfg.max_steps).model
        pairs = data.load_pairs(cfg.eval, "text", "label", split="validation")
        value, _ = evaluate_pairs(model, base.tokenizer, pairs, "classification", torch.device("cpu"), cfg)
        assert value <= 0.1, (kind, value)


def test_adalora_best_state_restores_its_own_rank_pattern(task_files, tiny_base_dir):
    """Early stopping restores an earlier evaluation: its weights come back with the rank_pattern they were
    masked under (not the last step's), so the saved, cut tensors are what that evaluation scored."""
    from serve.engine.base import load_base
    from training.methods import AdaLoraTrainable, build

    cfg = kind_config("adalora", task_files, tiny_base_dir, tiny_base_dir.parent / "unused")
    trainable = build(cfg, load_base(str(tiny_base_dir)), total_steps=10)
    assert isinstance(trainable, AdaLoraTrainable)
    peft_cfg = trainable.model.peft_config["default"]
    e_names = [n for n, _ in trainable.model.base_model.model.named_parameters() if "lora_E" in n]
    params = dict(trainable.model.base_model.model.named_parameters())
    with torch.no_grad():
        for n in e_names:
            params[n].fill_(1.0)
    early = {n: [i % 2 == 0 for i in range(12)] for n in e_names}
    peft_cfg.rank_pattern = early
    state = trainable.snapshot()
    with torch.no_grad():  # training goes on: weights move, the allocator keeps a different pattern
        for p in trainable.parameters():
            p.add_(0.5)
    peft_cfg.rank_pattern = {n: [True] * 12 for n in e_names}
    trainable.restore(state)
    assert peft_cfg.rank_pattern == early
    e = params[e_names[0]].detach().view(-1)
    assert e[0::2].eq(1.0).all() and e[1::2].eq(0.0).all()
