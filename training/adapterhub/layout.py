"""AdapterHub's on-disk adapter: adapter_config.json (build_full_config) and adapter.safetensors.

AdapterHub's state dict repeats the prefix pool under every attention layer (one shared tensor); its own
safetensors writer refuses that and falls back to pytorch_adapter.bin. We store each shared tensor once,
under the first layer's key; AdapterHub loads it into the shared pool (the other layers' keys are reported
missing at info level only, and read the same tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.adapterhub.config import adapter_config_json
from training.adapterhub.modules import adapter_tensors, attach

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


def save(out: Path, model, config: dict, name: str, base_name: str) -> None:
    out = Path(out)
    body = adapter_config_json(config, name, base_name, model.config.d_model)
    (out / CONFIG_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in adapter_tensors(model).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def load(model, directory: Path) -> str:
    """Attach the adapter saved in `directory` to `model` (frozen first) and load its weights; returns its
    name. Strict: the file holds exactly the tensors the config builds, under AdapterHub's names."""
    body = json.loads((Path(directory) / CONFIG_FILE).read_text())
    model.requires_grad_(False)
    attach(model, body["config"], body["name"])
    params = adapter_tensors(model)
    saved = load_file(str(Path(directory) / WEIGHTS_FILE))
    if set(saved) != set(params):
        raise ValueError(f"{directory}: tensors {sorted(set(saved) ^ set(params))[:4]} differ from what "
                         f"its config builds")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(saved[key])
    return body["name"]
