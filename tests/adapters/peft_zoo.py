"""Factories for real PEFT adapters with random, non-trivial weights (saved with save_pretrained)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def _save_peft(model, config, out: Path, seed: int, init=None) -> Path:
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    if init is not None:
        with torch.no_grad():
            init(peft_model)
    peft_model.save_pretrained(out)
    return out


def lora(model, out, seed, **kw):
    from peft import LoraConfig

    def tame(pm):  # init_lora_weights=False draws B like A; scale it to a trained adapter's size
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)

    kw.setdefault("target_modules", ["q", "v"])
    return _save_peft(model, LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False, lora_alpha=16, **kw),
                      out, seed, init=tame)


def ia3(model, out, seed, **kw):
    from peft import IA3Config

    def randomize(pm):  # vectors around 1 with real spread: a clearly different model, still stable
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))

    return _save_peft(model, IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False, **kw), out, seed,
                      init=randomize)


def prompt(model, out, seed, num_virtual_tokens, **kw):
    from peft import PromptTuningConfig

    def randomize(pm):
        for n, p in pm.named_parameters():
            if "prompt_encoder" in n:
                p.copy_(torch.randn_like(p))

    cfg = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens, **kw)
    return _save_peft(model, cfg, out, seed, init=randomize)
