"""Real PEFT adapters with random, non-trivial weights, saved with save_pretrained: the one place tests
make them (`save_peft` + `redraw` for any config; `lora`, `ia3`, `prompt`... for the usual shapes; `bitfit` in the
project's own format)."""

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


def bitfit(model, out, seed, base_name: str, suffixes=(".q", ".wo")):
    """A BitFit adapter in the project's format (adapters/bitfit.py; PEFT has no BitFit): biases of 0.5 x N(0, 1)
    on the linears whose paths end with `suffixes`."""
    from adapters import BaseDescription
    from adapters.bitfit import save_bitfit

    g = torch.Generator().manual_seed(seed)
    shapes = BaseDescription.from_model(model, "t", "t").linear_shapes
    biases = {p: 0.5 * torch.randn(s[1], generator=g) for p, s in shapes.items() if p.endswith(suffixes)}
    return save_bitfit(out, biases, base_model_name_or_path=base_name)


def dora(model, out, seed, **kw):
    """LoRA with use_dora, B at a trained size and the magnitude vector 0.9-1.1x of ||W + s·B·A|| per row
    (peft's init sets it to that norm, computed with the init B; redrawn here after B)."""
    from peft import LoraConfig

    kw.setdefault("target_modules", ["q", "v"])
    cfg = LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False, lora_alpha=16, use_dora=True, **kw)

    def init(pm) -> None:
        from loadtests.workload import redraw_dora_magnitudes

        redraw("lora_B", lambda p: 0.1 * p)(pm)
        redraw_dora_magnitudes(pm, spread=0.1)
    return save_peft(model, cfg, out, seed, init=init)


def adalora(model, out, seed, steps: int = 4, **kw):
    """AdaLoRA pruned by peft's own RankAllocator (real gradients, `update_and_allocate` to the final step),
    so the file holds a genuine rank_pattern and tensors cut to it."""
    from peft import AdaLoraConfig, get_peft_model

    kw.setdefault("target_modules", ["q", "v", "wo"])
    cfg = AdaLoraConfig(task_type="SEQ_2_SEQ_LM", init_r=6, target_r=2, tinit=0, tfinal=0, total_step=steps,
                        deltaT=1, lora_alpha=12, **kw)
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        redraw("lora_E", torch.randn_like)(pm)
        redraw("lora_B", lambda p: 0.3 * torch.randn_like(p))(pm)
    pm.train()
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    for step in range(1, steps + 1):
        ids = torch.randint(3, vocab, (4, 12), generator=g)
        labels = torch.randint(3, vocab, (4, 6), generator=g)
        pm(input_ids=ids, labels=labels).loss.backward()
        pm.base_model.update_and_allocate(step)
        pm.zero_grad()
    pm.eval()
    pm.save_pretrained(out)
    return out


def ptuning(model, out, seed, num_virtual_tokens, encoder="MLP", **kw):
    """P-tuning; its saved prompt_embeddings are the prompt encoder's output (peft runs it at save)."""
    from peft import PromptEncoderConfig

    cfg = PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens,
                              encoder_hidden_size=32, encoder_reparameterization_type=encoder, **kw)
    return save_peft(model, cfg, out, seed, init=redraw("prompt_encoder", lambda p: 0.5 * torch.randn_like(p)))


def prefix(model, out, seed, num_virtual_tokens, **kw):
    """Prefix tuning; with prefix_projection the saved table is the projection MLP's output."""
    from peft import PrefixTuningConfig

    cfg = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens, **kw)
    return save_peft(model, cfg, out, seed, init=redraw("prompt_encoder", lambda p: 0.5 * torch.randn_like(p)))
