"""Real PEFT adapters with random, non-trivial weights, saved with save_pretrained: the one place tests
make them (`save_peft` + `redraw` for any config; `lora`, `ia3`, `prompt` for the usual shapes)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def save_peft(model, config, out: Path, seed: int, init=None) -> Path:
    """get_peft_model on a copy of `model` (seeded), `init(peft_model)` under no_grad, save_pretrained."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    if init is not None:
        with torch.no_grad():
            init(peft_model)
    peft_model.save_pretrained(out)
    return out


def redraw(fragment: str, draw):
    """An `init` for save_peft: every parameter whose name contains `fragment` becomes draw(parameter).
    peft's own inits are identities (B = 0, (IA)3 = 1): a test adapter must change the model."""
    def init(peft_model) -> None:
        for name, p in peft_model.named_parameters():
            if fragment in name:
                p.copy_(draw(p))
    return init


def lora(model, out, seed, **kw):
    from peft import LoraConfig

    kw.setdefault("target_modules", ["q", "v"])
    # init_lora_weights=False draws B like A; scale it to a trained adapter's size
    return save_peft(model, LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False, lora_alpha=16, **kw),
                     out, seed, init=redraw("lora_B", lambda p: 0.1 * p))


def ia3(model, out, seed, **kw):
    from peft import IA3Config

    # vectors around 1 with real spread: a clearly different model, still stable
    return save_peft(model, IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False, **kw), out, seed,
                     init=redraw("ia3_l", lambda p: 1 + 0.5 * torch.randn_like(p)))


def prompt(model, out, seed, num_virtual_tokens, **kw):
    from peft import PromptTuningConfig

    cfg = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens, **kw)
    return save_peft(model, cfg, out, seed, init=redraw("prompt_encoder", torch.randn_like))
