"""Builders of hostile or broken adapter directories (each returns a directory; canaries go in `canary_dir`)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class _Canary:
    """Unpickling this calls open(path, "w"): the file appears iff someone unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def canary_pickle(canary: Path) -> bytes:
    return pickle.dumps(_Canary(str(canary)), protocol=2)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def missing(t: Path, zoo, canary: Path) -> Path:
    return t / "does-not-exist"


def empty_dir(t: Path, zoo, canary: Path) -> Path:
    (t / "empty").mkdir()
    return t / "empty"


def config_only(t: Path, zoo, canary: Path) -> Path:
    d = t / "config-only"
    d.mkdir()
    shutil.copy(zoo["lora-a"] / CONFIG, d / CONFIG)
    return d


def truncated(t: Path, zoo, canary: Path) -> Path:
    d = copy(zoo["lora-a"], t / "truncated")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    return d


def corrupt_header(t: Path, zoo, canary: Path) -> Path:
    d = copy(zoo["lora-a"], t / "corrupt")
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    return d


def absurd_header_len(t: Path, zoo, canary: Path) -> Path:
    d = copy(zoo["lora-a"], t / "absurd-len")
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return d


def absurd_shape(t: Path, zoo, canary: Path) -> Path:
    d = copy(zoo["lora-a"], t / "absurd-shape")
    header = json.dumps({"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": {
        "dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return d


def pickle_bin(t: Path, zoo, canary: Path) -> Path:
    d = t / "pickled"
    d.mkdir()
    shutil.copy(zoo["lora-a"] / CONFIG, d / CONFIG)
    (d / "adapter_model.bin").write_bytes(canary_pickle(canary))
    return d


def pickle_disguised(t: Path, zoo, canary: Path) -> Path:
    """Pickle bytes under the safetensors name: must be refused as corrupt, never unpickled."""
    d = t / "disguised"
    d.mkdir()
    shutil.copy(zoo["lora-a"] / CONFIG, d / CONFIG)
    (d / WEIGHTS).write_bytes(canary_pickle(canary))
    return d


def auto_map(t: Path, zoo, canary: Path) -> Path:
    """Custom code named by the config, and the module right there: importing it writes the canary."""
    d = copy(zoo["lora-a"], t / "auto-map")
    cfg = json.loads((d / CONFIG).read_text())
    cfg["auto_map"] = {"AutoModel": "evil_model.EvilModel", "AutoConfig": "evil_model.EvilConfig"}
    cfg["trust_remote_code"] = True
    (d / CONFIG).write_text(json.dumps(cfg))
    (d / "evil_model.py").write_text(f"open({str(canary)!r}, 'w').write('imported')\nclass EvilModel: pass\n")
    return d


def other_model_size(t: Path, zoo, canary: Path) -> Path:
    """A real PEFT LoRA trained on a T5 with another width (d_model 64 instead of 128)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2, vocab_size=384,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    model = get_peft_model(T5ForConditionalGeneration(cfg), LoraConfig(task_type="SEQ_2_SEQ_LM", r=4,
                                                                         target_modules=["q", "v"]))
    model.save_pretrained(t / "other-size")
    return t / "other-size"


def rank_over_limit(t: Path, zoo, canary: Path) -> Path:
    return zoo["lora-r32"]


def virtual_tokens_over_limit(t: Path, zoo, canary: Path) -> Path:
    """A prompt adapter with 40 virtual tokens (the server's max_virtual_tokens is 32)."""
    import torch
    from safetensors.torch import save_file

    d = copy(zoo["prompt-a"], t / "prompt-40")
    cfg = json.loads((d / CONFIG).read_text())
    cfg["num_virtual_tokens"] = 40
    (d / CONFIG).write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": torch.zeros(80, 128)}, str(d / WEIGHTS))
    return d


def symlinked_weights(t: Path, zoo, canary: Path) -> Path:
    """The weights are a symlink to a file outside the adapter directory (here: another adapter's)."""
    d = t / "symlinked"
    d.mkdir()
    shutil.copy(zoo["lora-b"] / CONFIG, d / CONFIG)
    os.symlink(zoo["lora-b"] / WEIGHTS, d / WEIGHTS)
    return d


def symlink_to_secret(t: Path, zoo, canary: Path) -> Path:
    d = t / "secret-link"
    d.mkdir()
    os.symlink("/etc/passwd", d / CONFIG)
    shutil.copy(zoo["lora-a"] / WEIGHTS, d / WEIGHTS)
    return d


def dotdot_source(t: Path, zoo, canary: Path) -> Path:
    """A source path that climbs out of its directory with `..` to reach an adapter elsewhere."""
    return Path(str(t / "x" / ".." / ".." / ".." / "etc"))


PATH_CASES = [missing, empty_dir, config_only, truncated, corrupt_header, absurd_header_len, absurd_shape,
              pickle_bin, pickle_disguised, auto_map, other_model_size, rank_over_limit, virtual_tokens_over_limit,
              symlinked_weights, symlink_to_secret, dotdot_source]
# Uploads carry file contents; directory-only cases (missing dir, symlinks, `..` paths) do not apply.
UPLOAD_CASES = [config_only, truncated, corrupt_header, absurd_header_len, absurd_shape, pickle_bin,
                pickle_disguised, auto_map, other_model_size, rank_over_limit, virtual_tokens_over_limit]
