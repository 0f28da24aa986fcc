"""Registry unit tests: real SQLite, real files, no Ray. The validator is injected (the app passes
adapters.inspect_adapter); here a small one that reads the config keeps these tests independent of it."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import save_file

from serve.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    AdapterRejected,
    AdapterTooLarge,
    InvalidAdapterName,
    check_name,
)

BASE = "sha256:registry-test-base"


class Spec(dict):
    def to_dict(self):
        return dict(self)


def validate(path: Path) -> Spec:
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterRejected(f"unsupported peft_type {cfg.get('peft_type')!r}")
    return Spec(kind="lora", rank=cfg["r"], path=str(path))


def make_adapter(d: Path, rank: int = 2, seed: float = 0.0) -> Path:
    import torch

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    save_file({"a": torch.full((rank, 4), seed)}, str(d / "adapter_model.safetensors"))
    return d


@pytest.fixture
def reg(tmp_path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "registry", max_adapter_bytes=1 << 20).for_base(BASE)


def test_register_get_list_and_store_layout(reg, tmp_path):
    src = make_adapter(tmp_path / "a1")
    g0 = reg.generation()
    rec = reg.register("my-adapter", src, validate)
    assert (rec.name, rec.version, rec.kind) == ("my-adapter", 1, "lora")
    assert reg.generation() == g0 + 1
    stored = Path(rec.path)
    assert stored.parent == reg.objects and stored.name == rec.digest
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (stored / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    assert rec.spec["rank"] == 2 and "path" not in rec.spec
    assert [r.name for r in reg.list()] == ["my-adapter"]
    assert list(reg.tmp.iterdir()) == []  # staging cleaned


def test_duplicate_name_409_unless_replace_which_bumps_version(reg, tmp_path):
    rec1 = reg.register("x", make_adapter(tmp_path / "a"), validate)
    with pytest.raises(AdapterExists, match="replace"):
        reg.register("x", make_adapter(tmp_path / "b", seed=1.0), validate)
    assert reg.get("x").version == 1
    rec2 = reg.register("x", make_adapter(tmp_path / "b", seed=1.0), validate, replace=True)
    assert rec2.version == 2 and rec2.digest != rec1.digest
    assert reg.get("x").digest == rec2.digest
    assert len(list(reg.objects.iterdir())) == 2  # the old version's object stays for in-flight requests


def test_same_content_is_stored_once(reg, tmp_path):
    a = reg.register("a", make_adapter(tmp_path / "a"), validate)
    b = reg.register("b", make_adapter(tmp_path / "b"), validate)
    assert a.digest == b.digest and len(list(reg.objects.iterdir())) == 1


def test_delete_then_404_and_reregister_gets_new_version(reg, tmp_path):
    reg.register("d", make_adapter(tmp_path / "a"), validate)
    reg.delete("d")
    with pytest.raises(AdapterNotFound):
        reg.get("d")
    with pytest.raises(AdapterNotFound):
        reg.delete("d")
    assert reg.list() == []
    assert reg.register("d", make_adapter(tmp_path / "a"), validate).version == 2


@pytest.mark.parametrize("name", ["", "../x", "/etc/passwd", "a/b", "..", "a..b", ".hidden", "x" * 129,
                                  "%2e%2e%2fx", "a b", "ä"])
def test_bad_names_rejected(reg, tmp_path, name):
    with pytest.raises(InvalidAdapterName):
        reg.register(name, make_adapter(tmp_path / "a"), validate)
    assert reg.list() == [] and list(reg.objects.iterdir()) == []


def test_name_limit_is_inclusive():
    assert check_name("x" * 128)


def test_rejected_adapters_leave_registry_unchanged(reg, tmp_path):
    g0 = reg.generation()
    missing = tmp_path / "nope"
    with pytest.raises(AdapterRejected, match="not a directory"):
        reg.register("m", missing, validate)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterRejected, match="pickled weights are never loaded"):
        reg.register("p", pickled, validate)
    bad = make_adapter(tmp_path / "bad")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterRejected, match="PREFIX_TUNING"):
        reg.register("b", bad, validate)
    big = make_adapter(tmp_path / "big")
    (big / "more.safetensors").write_bytes(b"0" * (2 << 20))
    with pytest.raises(AdapterTooLarge):
        reg.register("big", big, validate)
    assert reg.generation() == g0 and reg.list() == []
    assert list(reg.objects.iterdir()) == [] and list(reg.tmp.iterdir()) == []


def test_only_config_and_safetensors_are_stored(reg, tmp_path):
    src = make_adapter(tmp_path / "a")
    (src / "README.md").write_text("hi")
    (src / "training_args.bin").write_bytes(b"\x80")
    rec = reg.register("a", src, validate)
    assert sorted(p.name for p in Path(rec.path).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_reopen_sees_everything(tmp_path):
    root = tmp_path / "registry"
    AdapterRegistry(root).for_base(BASE).register("keep", make_adapter(tmp_path / "a"), validate)
    again = AdapterRegistry(root).for_base(BASE)
    assert again.get("keep").version == 1 and again.snapshot().adapters.keys() == {"keep"}


def test_concurrent_writers_same_name_exactly_one_wins(tmp_path):
    """Separate registry instances = separate SQLite connections: the same locking path as processes."""
    root = tmp_path / "registry"
    AdapterRegistry(root).for_base(BASE)
    srcs = [make_adapter(tmp_path / f"a{i}", seed=float(i)) for i in range(4)]
    barrier = threading.Barrier(len(srcs))

    def attempt(src: Path) -> str:
        reg = AdapterRegistry(root).for_base(BASE)
        barrier.wait()
        try:
            reg.register("race", src, validate)
            return "ok"
        except AdapterExists:
            return "exists"

    with ThreadPoolExecutor(len(srcs)) as pool:
        outcomes = sorted(pool.map(attempt, srcs))
    assert outcomes == ["exists"] * 3 + ["ok"]
    assert AdapterRegistry(root).for_base(BASE).get("race").version == 1


def test_gc_removes_only_unreferenced(reg, tmp_path):
    reg.register("a", make_adapter(tmp_path / "a"), validate)
    reg.register("b", make_adapter(tmp_path / "b", seed=2.0), validate)
    reg.delete("b")
    removed = reg.gc(min_age_s=0)
    assert len(removed) == 1 and Path(reg.get("a").path).exists()
