"""Demo adapters: trained once, cached per base fingerprint, servable; concurrent callers train once."""

from __future__ import annotations

import threading

from training.demo import DEMOS, DemoSpec, demo_dir, ensure_demo_adapters


def test_every_kind_has_a_demo():
    assert sorted(d.kind for d in DEMOS) == ["bitfit", "ia3", "lora", "prompt"]
    assert len({d.name for d in DEMOS}) == len(DEMOS)


def test_demo_adapters_train_once_and_are_cached(tiny_base_dir, tiny_base, tmp_path, monkeypatch):
    from adapters import AdapterLimits, BaseDescription, inspect_adapter

    monkeypatch.setenv("PEFTSERVE_HOME", str(tmp_path / "home"))
    quick = (DemoSpec("bitfit", "color", "paint it red -> warm", dict(max_steps=2, learning_rate=3e-2)),
             DemoSpec("prompt", "loudness", "LOUD -> loud", dict(max_steps=2, learning_rate=0.3)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_demo_adapters(tiny_base_dir, progress=False, demos=quick))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] and set(results[0]) == {"demo-color-bitfit", "demo-loudness-prompt"}
    root = demo_dir(tiny_base.fingerprint)
    assert all(p.parent == root for p in results[0].values())
    stamps = {n: (p / "adapter_model.safetensors").stat().st_mtime_ns for n, p in results[0].items()}
    base = BaseDescription.from_model(tiny_base.model, tiny_base.name, tiny_base.fingerprint)
    for name, path in results[0].items():
        assert inspect_adapter(path, base, AdapterLimits()).kind.value == name.rsplit("-", 1)[1]
    again = ensure_demo_adapters(tiny_base_dir, progress=False, demos=quick)  # cached: no retraining
    assert {n: (p / "adapter_model.safetensors").stat().st_mtime_ns for n, p in again.items()} == stamps


def test_the_app_registers_what_train_demo_trained(tiny_base_dir, tiny_base, tmp_path, monkeypatch, capsys):
    """The seam between training and the app (which never imports training): `peftserve train demo` trains and
    writes the MANIFEST; serve.app.demo registers what it names into a real registry, once."""
    from adapters import AdapterLimits, BaseDescription
    from serve.app.admin_routes import make_validator
    from serve.app.demo import demo_root, register_demo_adapters, trained_demo_adapters
    from serve.cli import main
    from serve.registry import open_registry

    monkeypatch.setenv("PEFTSERVE_HOME", str(tmp_path / "home"))
    assert trained_demo_adapters(tiny_base.fingerprint) == {}  # nothing trained: the app starts without them
    monkeypatch.setattr("training.demo.DEMOS", (DemoSpec("bitfit", "color", "paint it red -> warm",
                                                         dict(max_steps=2, learning_rate=3e-2)),))
    assert main(["train", "demo", "--base", str(tiny_base_dir), "--quiet"]) == 0
    assert "demo adapters ready: demo-color-bitfit" in capsys.readouterr().out
    trained = trained_demo_adapters(tiny_base.fingerprint)
    assert trained == {"demo-color-bitfit": demo_dir(tiny_base.fingerprint) / "demo-color-bitfit"}
    registry = open_registry(tmp_path / "registry").for_base(tiny_base.fingerprint, tiny_base.name)
    validate = make_validator(BaseDescription.from_model(tiny_base.model, tiny_base.name, tiny_base.fingerprint),
                              AdapterLimits())
    assert register_demo_adapters(registry, validate, tiny_base.fingerprint) == ["demo-color-bitfit"]
    assert [r.name for r in registry.list()] == ["demo-color-bitfit"]
    assert register_demo_adapters(registry, validate, tiny_base.fingerprint) == []  # a restart: already there
    (demo_root(tiny_base.fingerprint) / "demo-adapters.json").write_text('{"adapters": {"x": "../../elsewhere"}}')
    assert trained_demo_adapters(tiny_base.fingerprint) == {}  # only directories inside the demo root
