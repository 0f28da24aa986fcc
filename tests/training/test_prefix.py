"""Prefix tuning (`--method prefix`): peft's PrefixTuningConfig with token_dim = heads x d_kv, evaluated by
greedy decoding over repeated forwards (peft 0.21.2's generate drops T5 prefixes), and served by the engine
exactly as training evaluated it. The oracle is always peft's forward, never its generate."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from serve.cli import main
from tests.training.conftest import kind_config

TEXT = "THE SOUP WAS GREAT."
NEW_TOKENS = 8


def forward_greedy(model, tokenizer, text: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens by repeated full forwards of `model` (decoder_input_ids grown one token at a time)."""
    ids = tokenizer([text], return_tensors="pt").input_ids
    dec = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0, -1]
                      .argmax())
            dec = torch.cat((dec, torch.tensor([[nxt]])), 1)
            if nxt == model.config.eos_token_id:
                break
    return dec[0, 1:].tolist()


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel

    from serve.engine.base import load_base

    base = load_base(str(base_dir))
    return PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapter_dir)).eval(), base


def served(base_dir, adapter_dir, texts: list[str], new_tokens: int = NEW_TOKENS):
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    cfg = EngineConfig(base=str(base_dir), device_slots={"prefix": 1, "lora": 1}, max_batch_rows=16,
                       max_new_tokens_cap=16, max_input_tokens=64, request_timeout_s=120)
    with Engine.from_config(cfg) as engine:
        engine.register_adapter("trained-prefix", adapter_dir)
        (listed,) = [a for a in engine.adapters() if a["name"] == "trained-prefix"]
        assert listed["kind"] == "prefix"
        return engine.generate([GenerationRequest(t, adapter="trained-prefix",
                                                  params=GenerationParams(max_new_tokens=new_tokens)) for t in texts])


def t5_dir(tmp_path, enc: int, dec: int, **sizes):
    """A random tiny T5 (the embedded preset with other depths or attention sizes) and its ByT5 tokenizer."""
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    from serve.engine.base import t5_config

    cfg = t5_config("tiny")
    cfg.num_layers, cfg.num_decoder_layers = enc, dec
    for key, value in sizes.items():
        setattr(cfg, key, value)
    torch.manual_seed(5)
    model = T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * cfg.d_model**-0.5)
    out = tmp_path / f"t5-{enc}-{dec}-{'-'.join(f'{k}{v}' for k, v in sizes.items())}"
    model.save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


def eval_rows(cfg):
    from training import data

    return data.load_pairs(cfg.eval, "text", "label", max_samples=cfg.max_eval_samples, split="validation")


def test_prefix_learns_from_an_untrained_start(trained, task_files, tiny_base_dir):
    from serve.engine.base import load_base
    from training.methods import build
    from training.train import evaluate_pairs

    cfg = kind_config("prefix", task_files, tiny_base_dir, tiny_base_dir.parent / "unused")
    base = load_base(str(tiny_base_dir))
    start, _ = evaluate_pairs(build(cfg, base).model, base.tokenizer, eval_rows(cfg), "classification",
                              torch.device("cpu"), cfg)
    report = trained["prefix"].report
    assert start <= 0.1 and report["final_metrics"]["value"] >= 0.95, (start, report["final_metrics"])
    assert report["trainable_params"] == 20 * 4 * 2 * 128  # n tokens x layers x (key, value) x heads*d_kv


def test_saved_prefix_is_the_served_layout(trained, tiny_base):
    out = trained["prefix"].output
    config = json.loads((out / "adapter_config.json").read_text())
    c = tiny_base.model.config
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "SEQ_2_SEQ_LM"
    assert (config["token_dim"], config["num_attention_heads"]) == (c.num_heads * c.d_kv, c.num_heads)
    assert config["num_transformer_submodules"] == 2 and config["prefix_projection"] is False
    assert config["base_model_name_or_path"] == tiny_base.name
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        assert f.get_slice("prompt_embeddings").get_shape() == [20, c.num_layers * 2 * c.num_heads * c.d_kv]


def test_engine_serves_what_peft_forward_computes_and_training_evaluated(trained, task_files, tiny_base_dir):
    """The engine's greedy tokens are peft's repeated-forward greedy; the training evaluation (the same
    `evaluate_pairs` the loop calls) predicts exactly the engine's texts on every eval row."""
    from training.train import evaluate_pairs

    result = trained["prefix"]
    model, base = peft_model(tiny_base_dir, result.output)
    cfg = kind_config("prefix", task_files, tiny_base_dir, result.output)
    pairs = eval_rows(cfg)
    value, preds = evaluate_pairs(model, base.tokenizer, pairs, "classification", torch.device("cpu"), cfg)
    assert value == pytest.approx(result.metric)
    assert served(tiny_base_dir, result.output, [TEXT])[0].token_ids == forward_greedy(model, base.tokenizer, TEXT)
    # the evaluation's token budget (evaluate_pairs: longest target + 2)
    budget = min(cfg.max_target_length, max(len(base.tokenizer(t).input_ids) for t in pairs.targets) + 2)
    results = served(tiny_base_dir, result.output, pairs.sources, new_tokens=budget)
    assert [r.text.strip() for r in results] == preds


def test_peft_generate_drops_the_prefix(trained, tiny_base_dir):
    """Why training must not evaluate prefix tuning with peft's generate: it returns the base's tokens."""
    model, base = peft_model(tiny_base_dir, trained["prefix"].output)
    enc = base.tokenizer([TEXT], return_tensors="pt")
    with torch.no_grad():
        peft_gen = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                  max_new_tokens=NEW_TOKENS, do_sample=False)[0, 1:].tolist()
        base_gen = base.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                       max_new_tokens=NEW_TOKENS, do_sample=False)[0, 1:].tolist()
    assert peft_gen == base_gen, "peft's generate now applies T5 prefixes: the forward-greedy path may go"
    assert forward_greedy(model, base.tokenizer, TEXT) != peft_gen


def test_only_the_served_key_values_get_gradients(task_files, tiny_base_dir):
    """peft duplicates the 2L key/value tensors for two submodules and regroups them four per layer, so
    decoder layer i uses tensors (4i, 4i+1) mod 2L (adapters/prefix.py): the others train nothing."""
    from adapters.prefix import layer_sources
    from serve.engine.base import load_base
    from training import data
    from training.methods import build

    cfg = kind_config("prefix", task_files, tiny_base_dir, tiny_base_dir.parent / "unused")
    base = load_base(str(tiny_base_dir))
    trainable = build(cfg, base)
    batch = data.collate(data.encode_pairs(base.tokenizer, data.load_pairs(cfg.train, "text", "label", max_samples=8),
                                           64, 16), base.tokenizer.pad_token_id)
    trainable.model.train()
    trainable.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    (weight,) = trainable.parameters()
    c = base.model.config
    grads = weight.grad.view(20, 2 * c.num_layers, -1).norm(dim=(0, 2))
    used = {i for pair in layer_sources(c.num_layers, c.num_decoder_layers) for i in pair}
    assert {i for i, g in enumerate(grads.tolist()) if g > 0} == used == {0, 1, 4, 5}


def test_prefix_projection_saves_the_mlp_output_and_serves_it(task_files, tiny_base_dir, tmp_path):
    from training.train import train

    cfg = kind_config("prefix", task_files, tiny_base_dir, tmp_path / "proj", prefix_projection=True,
                      learning_rate=None, max_steps=80)
    assert cfg.lr == 3e-3  # the projection's default
    result = train(cfg)
    assert result.metric >= 0.95, result.report["final_metrics"]
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["prefix_projection"] is True and config["encoder_hidden_size"] == 128
    with safe_open(str(result.output / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]  # the MLP ran at save time; its weights are not shipped
        assert f.get_slice("prompt_embeddings").get_shape() == [20, 4 * 2 * 128]
    assert result.report["trainable_params"] > 20 * 4 * 2 * 128
    model, base = peft_model(tiny_base_dir, result.output)
    assert served(tiny_base_dir, result.output, [TEXT])[0].token_ids == forward_greedy(model, base.tokenizer, TEXT)


def test_token_dim_is_heads_times_d_kv_where_it_differs_from_d_model(task_files, tmp_path):
    """flan-t5-small's pitfall in small: 4 heads x d_kv 16 = 64 but d_model 128. peft's default token_dim
    (d_model) cannot even run a forward there; ours trains, saves and serves."""
    from peft import PrefixTuningConfig, get_peft_model

    from serve.engine.base import load_base
    from training.train import train

    base_dir = t5_dir(tmp_path, 4, 4, d_kv=16)
    base = load_base(str(base_dir))
    ids = base.tokenizer([TEXT], return_tensors="pt").input_ids
    default = get_peft_model(copy.deepcopy(base.model), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with pytest.raises(RuntimeError):
        default(input_ids=ids, labels=ids)
    result = train(kind_config("prefix", task_files, base_dir, tmp_path / "narrow", max_steps=3, eval_every=3,
                               max_eval_samples=8, stop_at_metric=None))
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert (config["token_dim"], config["num_attention_heads"]) == (64, 4)
    model, base = peft_model(base_dir, result.output)
    assert served(base_dir, result.output, [TEXT])[0].token_ids == forward_greedy(model, base.tokenizer, TEXT)


def test_a_decoder_deeper_than_the_encoder_is_refused_before_training(task_files, tmp_path, capsys):
    base_dir = t5_dir(tmp_path, 2, 3)
    out = tmp_path / "deep"
    assert main(["train", "--method", "prefix", "--base", str(base_dir), "--train", str(task_files[0]),
                 "--eval", str(task_files[1]), "--input-field", "text", "--target-field", "label",
                 "--output", str(out), "--quiet"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "its decoder has 3 layers but its encoder 2" in errors[0], errors
    assert not out.exists()
