"""The key forms of AdapterHub's shared prefix pool: every form AdapterHub 1.3's loader fills the pool from
is one and the same adapter here, copies must agree, and nothing AdapterHub would not find is accepted.

AdapterHub keeps one pool module (the model's `prefix_tuning`) that every attention layer also holds as `pool`;
`load_adapter` walks the module tree, so a pool tensor is found under the model-level key
`prefix_tuning.prefix_tunings.<name>...`, under any attention layer's `<layer>.prefix_tuning.pool.prefix_tunings...`,
under several of them (the last one visited wins), and with every key under `transformer.` (a flex-head model's
file). The committed fixtures hold the forms real tools write (make_fixtures.py, checked against AdapterHub);
the variants below are re-keyed copies of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import (
    AdapterLimits,
    AdapterMismatchError,
    BaseDescription,
    CorruptAdapterError,
    UnsupportedAdapterError,
    inspect_adapter,
    load_adapter,
)
from serve.registry import AdapterRegistry, AdapterRejected

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_LEVEL = "prefix_tuning.prefix_tunings."
SAVE_MODEL_LAYER = "decoder.block.0.layer.0.SelfAttention"  # the alphabetically first attention: save_model's pick


@pytest.fixture(scope="module")
def gated_desc() -> BaseDescription:
    from serve.engine.base import load_base

    b = load_base(str(FIXTURES / "base_gated"))
    return BaseDescription.from_model(b.model, b.name, b.fingerprint)


def _rekeyed(name: str, tmp: Path, rekey) -> Path:
    """A copy of fixture `name` whose tensors are {new key: value for (key, value) -> rekey(key, value)}."""
    out = tmp / name
    shutil.copytree(FIXTURES / name, out)
    tensors = load_file(str(out / "adapter.safetensors"))
    new: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for k, v in rekey(key, value):
            assert k not in new, k
            new[k] = v.clone()
    save_file(new, str(out / "adapter.safetensors"))
    return out


def _pool_tail(key: str) -> str | None:
    """`prefix_tunings.<name>.<location>.<param>` of a pool key in any form, else None."""
    return key[key.index("prefix_tunings."):] if ".prefix_tunings." in key or key.startswith(MODEL_LEVEL) else None


def _assert_same_adapter(a, b) -> None:
    assert a.spec.kind == b.spec.kind and a.spec.method == b.spec.method
    assert sorted(a.prefixes) == sorted(b.prefixes)
    for loc in a.prefixes:
        assert torch.equal(a.prefixes[loc].keys, b.prefixes[loc].keys), loc
        assert torch.equal(a.prefixes[loc].values, b.prefixes[loc].values), loc
    assert sorted(a.bottlenecks) == sorted(b.bottlenecks)
    for place in a.bottlenecks:
        assert torch.equal(a.bottlenecks[place].down, b.bottlenecks[place].down), place
        assert torch.equal(a.bottlenecks[place].up, b.bottlenecks[place].up), place


def test_the_fixtures_hold_the_forms_they_claim():
    """prefix_model_level / mam_model_level: the pool only under the model-level key; prefix_save_model: only
    under the name safetensors.torch.save_model kept (make_fixtures.py ran the real save_model); prefix_tuning:
    the first attention layer's key (state-dict order, as `peftserve adapters convert` keeps)."""
    expected = json.loads((FIXTURES / "expected.json").read_text())["adapters"]
    forms = {"prefix_model_level": MODEL_LEVEL, "mam_model_level": MODEL_LEVEL,
             "prefix_save_model": f"{SAVE_MODEL_LAYER}.prefix_tuning.pool.prefix_tunings.",
             "prefix_tuning": "encoder.block.0.layer.0.SelfAttention.prefix_tuning.pool.prefix_tunings."}
    for name, start in forms.items():
        keys = list(load_file(str(FIXTURES / name / "adapter.safetensors")))
        pool = [k for k in keys if _pool_tail(k)]
        assert pool and all(k.startswith(start) for k in pool), (name, pool[:2])
        assert len({_pool_tail(k) for k in pool}) == len(pool), name  # each pool tensor once
    assert expected["prefix_save_model"]["weights_written_by"].startswith("safetensors.torch.save_model")


@pytest.mark.parametrize("form", ["model_level", "save_model_layer", "cross_attention_layer", "every_key",
                                  "model_level_and_one_layer", "flex_head_model"])
def test_every_key_form_adapterhub_loads_is_the_same_adapter(gated_desc, tmp_path, form):
    """The MAM fixture stored with its pool under the model-level key, re-keyed into each other form."""
    layers = ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention",
              *(f"decoder.block.{b}.layer.{s}.{a}" for b in range(3) for s, a in ((0, "SelfAttention"),
                                                                                  (1, "EncDecAttention")))]

    def rekey(key: str, value: torch.Tensor):
        if form == "flex_head_model":
            return [("transformer." + key, value)]
        if not key.startswith(MODEL_LEVEL):
            return [(key, value)]
        tail = key[len("prefix_tuning."):]
        per_layer = {"save_model_layer": [SAVE_MODEL_LAYER], "cross_attention_layer": ["decoder.block.2.layer.1.EncDecAttention"],
                     "every_key": layers, "model_level_and_one_layer": ["encoder.block.1.layer.0.SelfAttention"],
                     "model_level": []}[form]
        out = [(f"{layer}.prefix_tuning.pool.{tail}", value) for layer in per_layer]
        if form in ("model_level", "every_key", "model_level_and_one_layer"):
            out.append((key, value))
        return out

    reference = load_adapter(FIXTURES / "mam_model_level", gated_desc)
    path = _rekeyed("mam_model_level", tmp_path, rekey)
    spec = inspect_adapter(path, gated_desc)
    assert spec.options["prefix_locations"] == ["encoder_prefix", "self_prefix", "cross_prefix"]
    _assert_same_adapter(reference, load_adapter(path, gated_desc))


def test_conflicting_copies_of_a_pool_tensor_are_refused_at_registration(gated_desc, tmp_path):
    """AdapterHub would silently take the copy it visits last (the model-level one); the server refuses the
    file, naming both keys, and the registry stores nothing."""
    def rekey(key: str, value: torch.Tensor):
        if key == f"{MODEL_LEVEL}prefix_model_level.self_prefix.wte.weight":
            return [(key, value), (f"{SAVE_MODEL_LAYER}.prefix_tuning.pool.{key[len('prefix_tuning.'):]}", value + 0.5)]
        return [(key, value)]

    path = _rekeyed("prefix_model_level", tmp_path, rekey)
    with pytest.raises(CorruptAdapterError, match="different values") as refused:
        inspect_adapter(path, gated_desc)
    assert f"{MODEL_LEVEL}prefix_model_level.self_prefix.wte.weight" in str(refused.value)
    assert f"{SAVE_MODEL_LAYER}.prefix_tuning.pool." in str(refused.value)
    from serve.app.admin_routes import make_validator  # what POST /adapters validates with

    registry = AdapterRegistry(tmp_path / "registry", max_adapter_bytes=1 << 24).for_base(gated_desc.fingerprint)
    with pytest.raises(AdapterRejected, match="different values"):
        registry.register("conflict", path, make_validator(gated_desc, AdapterLimits()))
    assert registry.list() == []


def test_a_copy_of_another_shape_is_refused(gated_desc, tmp_path):
    def rekey(key: str, value: torch.Tensor):
        if key.endswith("cross_prefix.control_trans.2.bias"):
            return [(key, value), (f"encoder.block.0.layer.0.SelfAttention.prefix_tuning.pool.{key[len('prefix_tuning.'):]}",
                                   value[:-1])]
        return [(key, value)]

    with pytest.raises(AdapterMismatchError, match="control_trans.2.bias"):
        inspect_adapter(_rekeyed("prefix_model_level", tmp_path, rekey), gated_desc)


@pytest.mark.parametrize("layer,words", [
    ("decoder.block.3.layer.0.SelfAttention", "does not have"),  # base_gated has 3 decoder blocks
    ("encoder.block.0.layer.1.EncDecAttention", "does not have"),  # no cross-attention in the encoder
])
def test_a_pool_copy_under_an_attention_the_base_lacks_is_refused(gated_desc, tmp_path, layer, words):
    """AdapterHub would never find a tensor there (no such module): refused like any tensor of another model."""
    def rekey(key: str, value: torch.Tensor):
        return [(f"{layer}.prefix_tuning.pool.{key[len('prefix_tuning.'):]}" if key.startswith(MODEL_LEVEL) else key,
                 value)]

    with pytest.raises(AdapterMismatchError, match=words):
        inspect_adapter(_rekeyed("prefix_model_level", tmp_path, rekey), gated_desc)


def test_keys_adapterhub_would_not_load_are_refused(gated_desc, tmp_path):
    # a file mixing a flex-head model's `transformer.` keys with plain ones: AdapterHub skips the plain ones
    path = _rekeyed("mam_model_level", tmp_path / "mixed",
                    lambda k, v: [("transformer." + k if k.startswith(MODEL_LEVEL) else k, v)])
    with pytest.raises(UnsupportedAdapterError, match="transformer"):
        inspect_adapter(path, gated_desc)
    # a pool parameter the config's prefix does not have
    path = _rekeyed("prefix_model_level", tmp_path / "stray",
                    lambda k, v: [(k, v)] + ([(k.replace("control_trans.2.bias", "control_trans.4.bias"), v)]
                                             if k.endswith("self_prefix.control_trans.2.bias") else []))
    with pytest.raises(AdapterMismatchError, match="control_trans.4.bias"):
        inspect_adapter(path, gated_desc)
    # the pool without the `prefix_tuning.` module in front: no module of the model has that path
    path = _rekeyed("prefix_model_level", tmp_path / "bare",
                    lambda k, v: [(k.removeprefix("prefix_tuning."), v)])
    with pytest.raises(UnsupportedAdapterError, match="unexpected tensor"):
        inspect_adapter(path, gated_desc)


def test_a_prefix_gate_where_the_config_puts_no_prefix_is_refused(gated_desc, tmp_path):
    """Config and weights agree both ways for gates too: cross-attention gates without a cross prefix."""
    path = _rekeyed("prefix_gated", tmp_path, lambda k, v: [] if ".cross_prefix." in k else [(k, v)])
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["config"]["cross_prefix"] = False
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="prefix gate on decoder.block.0.layer.1.EncDecAttention"):
        inspect_adapter(path, gated_desc)
