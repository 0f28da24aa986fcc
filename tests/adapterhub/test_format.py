"""AdapterHub's on-disk layout: what is accepted (with shared prefix tensors stored once, head files beside it),
what is refused and how the message says what to fix, and registration through the real registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapters import (
    AdapterKind,
    AdapterLimitError,
    AdapterLimits,
    AdapterMismatchError,
    BaseDescription,
    CorruptAdapterError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
    inspect_adapter,
    load_adapter,
)
from adapters.errors import AdapterError
from serve.registry import AdapterRegistry, AdapterRejected

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def gated_desc() -> BaseDescription:
    from serve.engine.base import load_base

    b = load_base(str(FIXTURES / "base_gated"))
    return BaseDescription.from_model(b.model, b.name, b.fingerprint)


def _copy(name: str, tmp: Path) -> Path:
    out = tmp / name
    shutil.copytree(FIXTURES / name, out)
    return out


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["config"].update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name,kind,method", [
    ("seq_bn", AdapterKind.ADAPTERHUB, "seq_bn"), ("double_seq_bn", AdapterKind.ADAPTERHUB, "double_seq_bn"),
    ("par_bn", AdapterKind.ADAPTERHUB, "par_bn"), ("prefix_tuning", AdapterKind.ADAPTERHUB, "prefix_tuning"),
    ("unipelt", AdapterKind.ADAPTERHUB, "unipelt"), ("mam", AdapterKind.ADAPTERHUB, "mam"),
    ("lora", AdapterKind.LORA, "lora"), ("ia3", AdapterKind.IA3, "ia3"),
    ("lora_gated", AdapterKind.ADAPTERHUB, "gated_lora"),
])
def test_specs(gated_desc, name, kind, method):
    spec = inspect_adapter(FIXTURES / name, gated_desc, name=name)
    assert (spec.kind, spec.method_name) == (kind, method)
    assert spec.options["format"] == "adapterhub"
    assert any("AdapterHub format" in n for n in spec.notes)


def test_head_files_are_ignored_and_noted(gated_desc):
    assert (FIXTURES / "seq_bn" / "head_config.json").exists()
    spec = inspect_adapter(FIXTURES / "seq_bn", gated_desc)
    assert any("prediction-head files" in n for n in spec.notes)


def test_prefix_pool_stored_once_or_under_every_layer_is_the_same_adapter(gated_desc, tmp_path):
    """AdapterHub's own state dict repeats the pool under every attention layer; both files load alike."""
    path = _copy("prefix_tuning", tmp_path)
    tensors = load_file(str(path / "adapter.safetensors"))
    pool = {k: v for k, v in tensors.items() if ".prefix_tuning.pool." in k}
    first_layer = next(iter(pool)).split(".prefix_tuning.")[0]
    repeated = dict(tensors)
    for key, value in pool.items():
        for layer in ("encoder.block.1.layer.0.SelfAttention", "decoder.block.2.layer.1.EncDecAttention"):
            repeated[key.replace(first_layer, layer)] = value.clone()
    save_file(repeated, str(path / "adapter.safetensors"))
    a = load_adapter(FIXTURES / "prefix_tuning", gated_desc)
    b = load_adapter(path, gated_desc)
    for loc in a.prefixes:
        assert (a.prefixes[loc].keys == b.prefixes[loc].keys).all()


def test_pickle_only_directory_names_the_convert_command(gated_desc, tmp_path):
    path = _copy("prefix_tuning", tmp_path)
    assert (path / "pytorch_adapter.bin").exists()
    (path / "adapter.safetensors").unlink()
    with pytest.raises(UnsafeAdapterFormatError, match="peftserve adapters convert"):
        inspect_adapter(path, gated_desc)


@pytest.mark.parametrize("change,error,words", [
    ({"phm_layer": True}, UnsupportedAdapterError, "PHM"),
    ({"non_linearity": "softplus2"}, UnsupportedAdapterError, "non-linearity"),
    ({"reduction_factor": 8}, AdapterMismatchError, "expected"),
    ({"reduction_factor": -1}, CorruptAdapterError, "positive"),
    ({"residual_before_ln": "post_add"}, UnsupportedAdapterError, "residual_before_ln"),
    ({"use_gating": True}, AdapterMismatchError, "gate"),
    ({"mh_adapter": True}, AdapterMismatchError, "mh_adapter"),
])
def test_bottleneck_config_errors(gated_desc, tmp_path, change, error, words):
    path = _copy("seq_bn", tmp_path)
    _edit_config(path, **change)
    with pytest.raises(error, match=words):
        inspect_adapter(path, gated_desc)


def test_other_refusals(gated_desc, tmp_path):
    path = _copy("prefix_tuning", tmp_path)
    _edit_config(path, leave_out=[0])
    with pytest.raises(UnsupportedAdapterError, match="leave_out"):
        inspect_adapter(path, gated_desc)
    with pytest.raises(AdapterLimitError, match="max_prefix_tokens"):
        inspect_adapter(FIXTURES / "prefix_tuning", gated_desc, AdapterLimits(max_prefix_tokens=2))
    with pytest.raises(AdapterLimitError, match="max_bottleneck"):
        inspect_adapter(FIXTURES / "par_bn", gated_desc, AdapterLimits(max_bottleneck=4))
    path = _copy("lora", tmp_path)
    _edit_config(path, attn_matrices=["q", "k", "v", "o"])
    with pytest.raises(UnsupportedAdapterError, match="attn_matrices"):
        inspect_adapter(path, gated_desc)
    path = _copy("unipelt", tmp_path / "u")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["name"] = "someone-else"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptAdapterError, match="belongs to adapter"):
        inspect_adapter(path, gated_desc)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    from serve.engine.base import load_base

    relu = load_base(str(FIXTURES / "base_relu"))
    desc = BaseDescription.from_model(relu.model, relu.name, relu.fingerprint)
    with pytest.raises(AdapterError):
        inspect_adapter(FIXTURES / "unipelt", desc)


def test_stray_tensor_is_refused(gated_desc, tmp_path):
    import torch

    path = _copy("seq_bn", tmp_path)
    tensors = load_file(str(path / "adapter.safetensors"))
    tensors["heads.seq_bn.0.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path / "adapter.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match="unexpected tensor"):
        inspect_adapter(path, gated_desc)


def test_registration_through_the_registry(gated_desc, tmp_path):
    reg = AdapterRegistry(tmp_path / "registry", max_adapter_bytes=1 << 24).for_base(gated_desc.fingerprint)
    rec = reg.register("uni", FIXTURES / "unipelt", lambda p: inspect_adapter(p, gated_desc, name="uni"))
    assert rec.spec["method"] == "unipelt"
    stored = Path(reg.get("uni").path)
    assert (stored / "adapter.safetensors").exists() and not (stored / "pytorch_adapter.bin").exists()
    only_pickle = _copy("prefix_tuning", tmp_path)
    (only_pickle / "adapter.safetensors").unlink()
    with pytest.raises(AdapterRejected, match="peftserve adapters convert"):
        reg.register("p", only_pickle, lambda p: inspect_adapter(p, gated_desc))
    assert [r.name for r in reg.list()] == ["uni"]
