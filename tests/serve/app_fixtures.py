"""Shared by the app test modules: real PEFT adapters of each kind on the tiny base, and one real Serve app
per module on 127.0.0.1 (Ray started once per module with 2 CPUs, shut down at module end)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.peft_zoo import redraw, save_peft


def make_zoo(tiny_base, root: Path) -> dict[str, Path]:
    """One adapter per kind (random, clearly non-identity weights) saved the way users save them."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    from adapters import BaseDescription
    from adapters.bitfit import save_bitfit

    m = tiny_base.model
    zoo = {
        "lora-a": save_peft(m, LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=16, init_lora_weights=False,
                                          target_modules=["q", "v"]), root / "lora-a", 1),
        "lora-b": save_peft(m, LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=8, init_lora_weights=False,
                                          target_modules=["k", "o"]), root / "lora-b", 2),
        # rank 32 is above the engine's max_rank (16): registration must refuse it
        "lora-r32": save_peft(m, LoraConfig(task_type="SEQ_2_SEQ_LM", r=32, init_lora_weights=False,
                                            target_modules=["q"]), root / "lora-r32", 6),
        "ia3-a": save_peft(m, IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False), root / "ia3-a", 3,
                           init=redraw("ia3_l", lambda p: 1 + 0.5 * torch.randn_like(p))),
        "prompt-a": save_peft(m, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
                              root / "prompt-a", 4, init=redraw("prompt_encoder", torch.randn_like)),
    }
    g = torch.Generator().manual_seed(5)
    biases = {p: 0.5 * torch.randn(shape[1], generator=g)
              for p, shape in BaseDescription.from_model(m, "t", "t").linear_shapes.items()
              if p.rsplit(".", 1)[-1] in ("q", "o")}
    zoo["bitfit-a"] = save_bitfit(root / "bitfit-a", biases, base_model_name_or_path=tiny_base.name,
                                  target_modules=["q", "o"])
    return zoo


def app_args(base_dir: Path, registry_dir: Path, **extra) -> dict:
    engine = {"base": str(base_dir), "max_batch_rows": 8, "max_new_tokens_cap": 32, "default_max_new_tokens": 8,
              "max_queue": 64, "request_timeout_s": 60, "host_bytes": "64MiB",
              "device_slots": {"lora": 4, "ia3": 2, "bitfit": 2, "prompt": 2, "adapterhub": 2}}
    engine.update(extra.pop("engine", {}))
    return {"engine": engine, "registry_dir": str(registry_dir), "demo_adapters": False,
            "metrics_push_interval_s": 0.5, **extra}


def build(args: dict, engine_replicas: int = 1):
    from serve.app.builder import build_app
    from serve.app.config import AppConfig

    config = AppConfig.model_validate(args)
    if engine_replicas == 1:
        return build_app(config)
    opts = {"EngineReplica": {"num_replicas": engine_replicas, "ray_actor_options": {"num_cpus": 0.5}}}
    if config.topology == "split":
        opts["Ingress"] = {"ray_actor_options": {"num_cpus": 0.25}}
    return build_app(config, opts)
