"""Data path (real shared data, CSV, templates, sampling) and every bad input, caught before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from training.config import TrainConfig
from training.data import infer_task, load_pairs
from training.errors import DataError, OutputExistsError, TrainConfigError


def cfg(tmp_path, **kw) -> TrainConfig:
    kw.setdefault("train", str(tmp_path / "train.jsonl"))
    return TrainConfig(method=kw.pop("method", "lora"), output=kw.pop("output", tmp_path / "out"), progress=False,
                       **kw)


def test_real_shared_data_loads_with_sampling_and_task_types(shared_data):
    cola = load_pairs(str(shared_data / "cola" / "train.jsonl"), max_samples=64, seed=3)
    assert len(cola) == 64 and set(cola.label_set) == {"acceptable", "unacceptable"}
    assert cola.sources == load_pairs(str(shared_data / "cola" / "train.jsonl"), max_samples=64, seed=3).sources
    assert cola.sources != load_pairs(str(shared_data / "cola" / "train.jsonl"), max_samples=64, seed=4).sources
    assert infer_task(cola, "auto") == "classification"
    ag = load_pairs(str(shared_data / "ag_news" / "dev.jsonl"), max_samples=100)
    assert infer_task(ag, "auto") == "classification" and set(ag.label_set) <= {"World", "Sports", "Business", "Sci/Tech"}
    e2e = load_pairs(str(shared_data / "e2e_nlg" / "dev.jsonl"), template="MR: {input}")
    assert len(e2e) == 60 and e2e.sources[0].startswith("MR: Describe the restaurant")
    assert infer_task(e2e, "auto") == "generation"


def test_real_data_runs_through_prepare(shared_data, tiny_base_dir, tmp_path):
    from training.train import prepare

    p = prepare(cfg(tmp_path, train=str(shared_data / "e2e_nlg" / "train.jsonl"),
                    eval=str(shared_data / "e2e_nlg" / "dev.jsonl"), max_train_samples=50, max_eval_samples=10,
                    base=str(tiny_base_dir)))
    assert p.task == "generation" and len(p.train) == 50 and len(p.eval) == 10


def test_csv_with_custom_fields_and_template(tmp_path):
    f = tmp_path / "rows.csv"
    f.write_text("sentence,label,source\nthe cat sat,yes,a\ncat the sat,no,b\n")
    pairs = load_pairs(str(f), input_field="sentence", target_field="label", template="[{source}] {sentence}")
    assert pairs.sources == ["[a] the cat sat", "[b] cat the sat"] and pairs.targets == ["yes", "no"]


@pytest.mark.parametrize("content, kw, message", [
    (None, {}, "does not exist"),
    ("", {}, "is empty"),
    ('{"text": "a", "label": "x"}\n', {}, "not found"),
    ('{"input": "a", "target": ""}\n{"input": "b", "target": "y"}\n', {}, "empty 'target'"),
    ('{"input": "a", "target": "x"}\n{"input": "b", "target": "y"}\n', {"template": "Q: {question}"}, "question"),
    ('{"input": "a", "target": "x"\n', {}, "could not read"),
])
def test_bad_data_is_a_clear_error_before_training(tmp_path, tiny_base_dir, content, kw, message):
    from training.train import prepare

    f = tmp_path / "train.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare(cfg(tmp_path, base=str(tiny_base_dir), **kw))
    assert not (tmp_path / "out").exists()


def test_classification_needs_two_labels(tmp_path, tiny_base_dir):
    from training.train import prepare

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input": f"x{i}", "target": "same"}) + "\n"
                                                  for i in range(10)))
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        prepare(cfg(tmp_path, base=str(tiny_base_dir), task="classification"))


@pytest.mark.parametrize("kw, message", [
    ({"lora_rank": 0}, "--lora-rank"), ({"lora_dropout": 1.0}, "--lora-dropout"),
    ({"learning_rate": -1.0}, "--learning-rate"), ({"num_virtual_tokens": 0}, "--num-virtual-tokens"),
    ({"batch_size": 0}, "--batch-size"), ({"layers": "first:0"}, "--layers"), ({"layers": "x"}, "--layers"),
    ({"target_modules": ["query"]}, "unknown target"), ({"module_groups": ["mlp"]}, "module group"),
    ({"method": "ia3", "feedforward_modules": ["wi_0"]}, "must also be in"),
    ({"method": "prompt", "prompt_init": "text"}, "--prompt-init-text"),
    ({"method": "prompt", "layers": "last:1"}, "do not apply"), ({"method": "adapterhub"}, "--method"),
])
def test_method_options_out_of_range(tmp_path, kw, message):
    with pytest.raises(TrainConfigError, match=message):
        cfg(tmp_path, **kw).validate()


def test_layer_selection_is_checked_against_the_base(tmp_path, tiny_base_dir):
    from training.train import prepare

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input": f"x{i}", "target": "ab"[i % 2]}) + "\n"
                                                  for i in range(10)))
    with pytest.raises(TrainConfigError, match="does not exist"):
        prepare(cfg(tmp_path, base=str(tiny_base_dir), layers="0,9"))
    with pytest.raises(TrainConfigError, match="no T5 linear matches"):
        prepare(cfg(tmp_path, base=str(tiny_base_dir), target_modules=["q"], module_groups=["feed-forward"]))


def test_selection_resolves_layers_and_groups(tiny_base, tmp_path):
    from training.methods import select_modules

    chosen = select_modules(tiny_base.model, cfg(tmp_path, target_modules=["q", "wo"], layers="last:1",
                                                 module_groups=["decoder", "feed-forward"]))
    assert chosen == ["decoder.block.3.layer.2.DenseReluDense.wo"]
    enc = select_modules(tiny_base.model, cfg(tmp_path, target_modules=["q"], layers="0,2",
                                              module_groups=["encoder"]))
    assert enc == ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.2.layer.0.SelfAttention.q"]


def test_output_dir_not_empty_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (tmp_path / "train.jsonl").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        cfg(tmp_path).validate()
    cfg(tmp_path, overwrite=True).validate()


def test_metrics_load_offline_from_the_project(tmp_path):
    code = ("from training.metrics import score;"
            "print(score('classification', ['a', 'b'], ['a', 'c'])[1], score('generation', ['the cat'], ['the cat'])[1])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0.5", "1.0"]


def test_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load hub dataset 'no-such-org/no-such-set'"):
        load_pairs("no-such-org/no-such-set")
