"""Every validation error, each from a real bad file; the message says what to fix."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import (
    AdapterLimitError,
    AdapterLimits,
    AdapterMismatchError,
    AdapterNotFoundError,
    CorruptAdapterError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
    inspect_adapter,
    load_adapter,
)
from tests import peft_zoo

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def clone(zoo, name, tmp_path):
    return shutil.copytree(zoo[name], tmp_path / name)


def edit_config(path, **changes):
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))
    return path


def edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS)
    save_file(fn(tensors), path / WEIGHTS)
    return path


class Canary:
    """Unpickling this writes a file: if the file appears, something unpickled the adapter."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- files and formats ------------------------------------------------------------------------------

def test_missing_directory(tiny_desc, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        inspect_adapter(tmp_path / "nope", tiny_desc)


def test_missing_config(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    (path / CONFIG).unlink()
    with pytest.raises(AdapterNotFoundError, match="no adapter_config.json"):
        inspect_adapter(path, tiny_desc)


def test_missing_weights(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    (path / WEIGHTS).unlink()
    with pytest.raises(AdapterNotFoundError, match="save_pretrained"):
        inspect_adapter(path, tiny_desc)


def test_pickle_weights_are_refused_and_never_unpickled(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    canary = tmp_path / "canary"
    tensors = load_file(path / WEIGHTS)
    (path / WEIGHTS).unlink()
    with open(path / "adapter_model.bin", "wb") as f:
        pickle.dump({"payload": Canary(canary), **tensors}, f)
    with pytest.raises(UnsafeAdapterFormatError, match="safe_serialization=True"):
        load_adapter(path, tiny_desc)
    assert not canary.exists()
    # a pickle under the safetensors name is not parsed as anything but a (corrupt) safetensors file
    (path / "adapter_model.bin").rename(path / WEIGHTS)
    with pytest.raises(CorruptAdapterError):
        load_adapter(path, tiny_desc)
    (path / WEIGHTS).rename(path / "adapter_model.bin")
    assert not canary.exists()
    # with safetensors present too, the .bin is ignored (never opened)
    save_file(tensors, path / WEIGHTS)
    assert load_adapter(path, tiny_desc).spec.rank == 4
    assert not canary.exists()


def test_corrupt_safetensors(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    raw = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(raw[:8] + b"\x00garbage" + raw[16:])
    with pytest.raises(CorruptAdapterError, match="corrupt safetensors header"):
        inspect_adapter(path, tiny_desc)


def test_truncated_safetensors(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    raw = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CorruptAdapterError, match="truncated"):
        inspect_adapter(path, tiny_desc)
    (path / WEIGHTS).write_bytes(raw[:5])
    with pytest.raises(CorruptAdapterError, match="truncated"):
        inspect_adapter(path, tiny_desc)


def test_absurd_header_size(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    raw = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    with pytest.raises(CorruptAdapterError, match="header"):
        inspect_adapter(path, tiny_desc)


def test_integer_tensors(zoo, tiny_desc, tmp_path):
    path = edit_tensors(clone(zoo, "lora_qv_r4", tmp_path), lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    with pytest.raises(CorruptAdapterError, match="floating point"):
        inspect_adapter(path, tiny_desc)


def test_nan_weights_pass_the_header_check_but_fail_the_load(zoo, tiny_desc, tmp_path):
    def poison(t):
        k = next(iter(t))
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")
        return t

    path = edit_tensors(clone(zoo, "lora_qv_r4", tmp_path), poison)
    assert inspect_adapter(path, tiny_desc).rank == 4  # header only: cheap at registration
    with pytest.raises(CorruptAdapterError, match="NaN"):
        load_adapter(path, tiny_desc)


def test_invalid_config_json(zoo, tiny_desc, tmp_path):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    (path / CONFIG).write_text("{not json")
    with pytest.raises(CorruptAdapterError, match="not valid JSON"):
        inspect_adapter(path, tiny_desc)


def test_auto_map_and_custom_code_are_ignored(zoo, tiny_desc, tmp_path, monkeypatch):
    path = clone(zoo, "lora_qv_r4", tmp_path)
    canary = tmp_path / "imported"
    (path / "evil.py").write_text(f"open({str(canary)!r}, 'w').write('x')\n")
    edit_config(path, auto_map={"AutoModel": "evil.Model", "AutoConfig": "evil.Config"}, trust_remote_code=True)
    monkeypatch.syspath_prepend(str(path))
    assert load_adapter(path, tiny_desc).spec.rank == 4
    assert not canary.exists()


# ---- types and options ------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not served"),
    ({"peft_type": None}, "peft_type None"),
    ({"task_type": "CAUSAL_LM"}, "SEQ_2_SEQ_LM"),
    ({"bias": "all"}, "bias='none'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
])
def test_unsupported_types_and_options(zoo, tiny_desc, tmp_path, changes, match):
    path = edit_config(clone(zoo, "lora_qv_r4", tmp_path), **changes)
    with pytest.raises(UnsupportedAdapterError, match=match):
        inspect_adapter(path, tiny_desc)


def test_prompt_needs_seq2seq_task(zoo, tiny_desc, tmp_path):
    path = edit_config(clone(zoo, "prompt_5", tmp_path), task_type=None)
    with pytest.raises(UnsupportedAdapterError, match="SEQ_2_SEQ_LM"):
        inspect_adapter(path, tiny_desc)


def test_peft_method_files_that_cannot_be_served(zoo, tiny_desc, tmp_path):
    """Issue 13's validation, each on a real file written by peft and then damaged the way it happens."""
    from adapters.errors import AdapterMismatchError

    cases = [
        # a plain LoRA file whose config claims DoRA: the magnitude vectors are missing
        (edit_config(clone(zoo, "lora_qv_r4", tmp_path / "a"), use_dora=True), AdapterMismatchError,
         "lora_magnitude_vector"),
        # DoRA with an option its math does not cover
        (edit_config(clone(zoo, "dora_qv_r4", tmp_path / "b"), lora_bias=True), UnsupportedAdapterError, "lora_bias"),
        # AdaLoRA without its rank data
        (edit_config(clone(zoo, "adalora_pruned", tmp_path / "c"), init_r=None), AdapterMismatchError, "init_r"),
        (edit_tensors(clone(zoo, "adalora_pruned", tmp_path / "d"),
                      lambda t: {k: v for k, v in t.items() if not k.endswith("lora_E")}),
         AdapterMismatchError, "lacks lora_E"),
        # a prefix made for another attention geometry, or another depth
        (edit_config(clone(zoo, "prefix_6", tmp_path / "g"), num_attention_heads=8), AdapterMismatchError,
         "heads"),
        (edit_config(clone(zoo, "prefix_6", tmp_path / "h"), num_layers=6), AdapterMismatchError, "num_layers=6"),
        # P-tuning with a prompt encoder peft does not have
        (edit_config(clone(zoo, "ptune_mlp", tmp_path / "f"), encoder_reparameterization_type="GRU"),
         UnsupportedAdapterError, "prompt encoder 'GRU' is unknown"),
    ]
    pruned = clone(zoo, "adalora_pruned", tmp_path / "e")
    pattern = json.loads((pruned / CONFIG).read_text())["rank_pattern"]
    key = next(k for k, v in pattern.items() if sum(v) > 0)
    pattern[key] = [True] * len(pattern[key])  # claims every rank was kept; the tensors are cut
    cases.append((edit_config(pruned, rank_pattern=pattern), AdapterMismatchError, "config and weights disagree"))
    for path, error, match in cases:
        with pytest.raises(error, match=match):
            inspect_adapter(path, tiny_desc)


def test_prefix_longer_than_the_limit_is_refused(zoo, tiny_desc):
    from adapters import AdapterLimits
    from adapters.errors import AdapterLimitError

    with pytest.raises(AdapterLimitError, match="6-token prefix is above this server's max_prefix_tokens=4"):
        inspect_adapter(zoo["prefix_6"], tiny_desc, AdapterLimits(max_prefix_tokens=4))
    spec = inspect_adapter(zoo["prefix_6"], tiny_desc).to_dict()
    assert (spec["kind"], spec["method"], spec["num_virtual_tokens"]) == ("prefix", "prefix", 6)


def test_peft_methods_report_what_they_are(zoo, tiny_desc):
    specs = {name: inspect_adapter(zoo[name], tiny_desc).to_dict()
             for name in ("dora_qv_r4", "adalora_pruned", "ptune_mlp", "ptune_lstm_single", "lora_qv_r4")}
    assert {n: (s["kind"], s["method"]) for n, s in specs.items()} == {
        "dora_qv_r4": ("lora", "dora"), "adalora_pruned": ("lora", "adalora"), "ptune_mlp": ("prompt", "p_tuning"),
        "ptune_lstm_single": ("prompt", "p_tuning"), "lora_qv_r4": ("lora", "lora")}
    assert specs["adalora_pruned"]["options"]["pruned"] and 0 < specs["adalora_pruned"]["rank"] <= 6
    assert specs["ptune_lstm_single"]["options"]["prompt_encoder"] == "LSTM"
    assert specs["ptune_mlp"]["num_virtual_tokens"] == 6


# ---- fit to the base --------------------------------------------------------------------------------

def test_target_module_not_in_base(zoo, tiny_desc, tmp_path):
    path = edit_config(clone(zoo, "lora_qv_r4", tmp_path), target_modules=["q", "q_proj"])
    with pytest.raises(AdapterMismatchError, match="q_proj not in base"):
        inspect_adapter(path, tiny_desc)
    path = edit_config(clone(zoo, "lora_regex", tmp_path / "b"), target_modules=r".*self_attn\.q_proj")
    with pytest.raises(AdapterMismatchError, match="matches no linear"):
        inspect_adapter(path, tiny_desc)


def test_tensor_for_a_module_the_base_lacks(zoo, tiny_desc, tmp_path):
    path = edit_tensors(clone(zoo, "lora_qv_r4", tmp_path),
                        lambda t: {k.replace("block.3.", "block.7."): v for k, v in t.items()})
    with pytest.raises(AdapterMismatchError, match="block.7.*not a target linear"):
        inspect_adapter(path, tiny_desc)


@pytest.fixture(scope="module")
def other_size_model(tiny_base):
    """A T5 like the tiny base but with d_model 64: adapters trained on it must not fit."""
    from transformers import T5ForConditionalGeneration

    config = tiny_base.model.config.to_dict()
    config.update(d_model=64, d_kv=16)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(type(tiny_base.model.config).from_dict(config))


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_adapter_trained_for_another_model_size(other_size_model, tiny_desc, tmp_path, kind):
    make = {"lora": lambda p: peft_zoo.lora(other_size_model, p, 0, r=2),
            "ia3": lambda p: peft_zoo.ia3(other_size_model, p, 0),
            "prompt": lambda p: peft_zoo.prompt(other_size_model, p, 0, 4)}[kind]
    with pytest.raises(AdapterMismatchError, match="different model size|another model"):
        inspect_adapter(make(tmp_path / kind), tiny_desc)


def test_ia3_vector_on_the_wrong_side(zoo, tiny_desc, tmp_path):
    path = edit_config(clone(zoo, "ia3_default", tmp_path), feedforward_modules=["wi_0"])
    with pytest.raises(AdapterMismatchError, match="feedforward_modules"):
        inspect_adapter(path, tiny_desc)


def test_bitfit_shape_and_targets(zoo, tiny_desc, tmp_path):
    path = edit_tensors(clone(zoo, "bitfit_attn", tmp_path), lambda t: {k: v[:-1] for k, v in t.items()})
    with pytest.raises(AdapterMismatchError, match="different model size"):
        inspect_adapter(path, tiny_desc)
    path = edit_config(clone(zoo, "bitfit_attn", tmp_path / "b"), target_modules=["q"])
    with pytest.raises(AdapterMismatchError, match="target_modules"):
        inspect_adapter(path, tiny_desc)


def test_layers_to_transform_disagreeing_with_tensors(zoo, tiny_desc, tmp_path):
    path = edit_config(clone(zoo, "lora_layers_pattern", tmp_path), layers_to_transform=[1])
    with pytest.raises(AdapterMismatchError, match="layers_to_transform"):
        inspect_adapter(path, tiny_desc)


# ---- limits -----------------------------------------------------------------------------------------

def test_rank_above_limit(zoo, tiny_desc):
    with pytest.raises(AdapterLimitError, match="max_rank=4"):
        inspect_adapter(zoo["lora_all_r8_rslora"], tiny_desc, AdapterLimits(max_rank=4))
    assert inspect_adapter(zoo["lora_all_r8_rslora"], tiny_desc, AdapterLimits(max_rank=8)).rank == 8


def test_virtual_tokens_above_limit(zoo, tiny_desc):
    with pytest.raises(AdapterLimitError, match="max_virtual_tokens=8"):
        inspect_adapter(zoo["prompt_9_single"], tiny_desc, AdapterLimits(max_virtual_tokens=8))


def test_file_above_max_bytes(zoo, tiny_desc):
    size = (zoo["lora_qv_r4"] / WEIGHTS).stat().st_size
    with pytest.raises(AdapterLimitError, match="max_file_bytes"):
        inspect_adapter(zoo["lora_qv_r4"], tiny_desc, AdapterLimits(max_file_bytes=size - 1))
