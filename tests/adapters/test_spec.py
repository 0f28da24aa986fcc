"""inspect_adapter's spec for each kind, load_adapter's dataclasses, and the BitFit format round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from adapters import (
    AdapterError,
    AdapterKind,
    BitFitWeights,
    LoraWeights,
    inspect_adapter,
    load_adapter,
    save_bitfit,
)


def test_lora_spec_and_scaling_folded(zoo, tiny_desc):
    spec = inspect_adapter(zoo["lora_layers_pattern"], tiny_desc, name="pat")
    assert (spec.name, spec.kind, spec.rank, spec.targets) == ("pat", AdapterKind.LORA, 6, ("k", "o", "q", "wo"))
    assert {int(m.split(".")[2]) for m in spec.modules} == {1, 3}
    assert spec.size_bytes == (zoo["lora_layers_pattern"] / "adapter_model.safetensors").stat().st_size
    assert spec.base_model == tiny_desc.name or spec.base_model.endswith("tiny")
    w = load_adapter(zoo["lora_layers_pattern"], tiny_desc)
    assert isinstance(w, LoraWeights) and w.nbytes > 0
    raw = load_file(zoo["lora_layers_pattern"] / "adapter_model.safetensors")
    for module, expected in (("encoder.block.1.layer.1.DenseReluDense.wo", 16 / 6),  # rank_pattern r=6
                             ("encoder.block.1.layer.0.SelfAttention.k", 3.0 / 2),  # alpha_pattern alpha=3
                             ("decoder.block.3.layer.0.SelfAttention.q", 16 / 2)):
        b = raw[f"base_model.model.{module}.lora_B.weight"]
        assert torch.allclose(w.b[module], b * expected)
    rs = load_adapter(zoo["lora_all_r8_rslora"], tiny_desc)
    m = rs.spec.modules[0]
    assert torch.allclose(rs.b[m], load_file(zoo["lora_all_r8_rslora"] / "adapter_model.safetensors")[
        f"base_model.model.{m}.lora_B.weight"] * 16 / math.sqrt(8))
    json.dumps(spec.to_dict())


def test_ia3_prompt_bitfit_specs(zoo, tiny_desc):
    ia3 = inspect_adapter(zoo["ia3_default"], tiny_desc)
    assert ia3.kind == AdapterKind.IA3 and ia3.rank is None and ia3.targets == ("k", "v", "wo")
    assert ia3.options["feedforward_targets"] == ["wo"]
    p = inspect_adapter(zoo["prompt_5"], tiny_desc)
    assert (p.kind, p.num_virtual_tokens, p.targets) == (AdapterKind.PROMPT, 5, ())
    assert "encoder prompt only" in p.notes[0]
    assert inspect_adapter(zoo["prompt_9_single"], tiny_desc).notes == ()
    assert load_adapter(zoo["prompt_5"], tiny_desc).embeddings.shape == (5, tiny_desc.d_model)
    b = inspect_adapter(zoo["bitfit_ffn"], tiny_desc)
    assert b.kind == AdapterKind.BITFIT and b.targets == ("v", "wi_1", "wo")
    assert {int(m.split(".")[2]) for m in b.modules} == {0, 2}
    d = b.to_dict()
    assert d["kind"] == "bitfit" and d["num_modules"] == len(b.modules) and json.dumps(d)


def test_save_bitfit_round_trip_and_format(tiny_desc, tmp_path):
    path = "decoder.block.1.layer.1.EncDecAttention.o"
    bias = torch.randn(tiny_desc.linear_shapes[path][1])
    save_bitfit(tmp_path / "bf", {path: bias}, base_model_name_or_path="x", base_fingerprint="sha256:abc")
    cfg = json.loads((tmp_path / "bf" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["target_modules"] == ["o"] and cfg["task_type"] == "SEQ_2_SEQ_LM"
    assert set(load_file(tmp_path / "bf" / "adapter_model.safetensors")) == {f"base_model.model.{path}.bias"}
    w = load_adapter(tmp_path / "bf", tiny_desc)
    assert isinstance(w, BitFitWeights) and torch.equal(w.biases[path], bias)
    assert w.spec.base_fingerprint == "sha256:abc" and w.spec.base_model == "x"
    assert not list((tmp_path / "bf").glob(".*.tmp"))
    with pytest.raises(AdapterError, match="not a T5 target"):
        save_bitfit(tmp_path / "bad", {"lm_head": bias})
