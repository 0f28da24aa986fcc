"""A zoo of real PEFT adapters (random, non-trivial weights) saved with save_pretrained on the tiny base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters import AdapterKind, BaseDescription, SlotConfig, attach_slots, load_adapter

SLOT_OF = {  # adapter name -> (kind, slot)
    "lora_qv_r4": (AdapterKind.LORA, 0), "lora_all_r8_rslora": (AdapterKind.LORA, 1),
    "lora_layers_pattern": (AdapterKind.LORA, 2), "lora_regex": (AdapterKind.LORA, 3),
    "ia3_default": (AdapterKind.IA3, 0), "ia3_mixed": (AdapterKind.IA3, 1),
    "bitfit_attn": (AdapterKind.BITFIT, 0), "bitfit_ffn": (AdapterKind.BITFIT, 1),
    "prompt_5": (AdapterKind.PROMPT, 0), "prompt_9_single": (AdapterKind.PROMPT, 1),
}

# Rows of the batch: every adapter once, two base rows, and a repeated adapter.
ROWS = [None, "lora_qv_r4", "ia3_default", "prompt_5", "bitfit_attn", "lora_all_r8_rslora", "ia3_mixed",
        "prompt_9_single", "bitfit_ffn", "lora_layers_pattern", None, "lora_regex", "lora_qv_r4", "prompt_5"]


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


@pytest.fixture(scope="session")
def tiny_desc(tiny_base) -> BaseDescription:
    return BaseDescription.from_model(tiny_base.model, tiny_base.name, tiny_base.fingerprint)


@pytest.fixture(scope="session")
def zoo(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """name -> adapter dir; several per kind with different ranks/targets/options."""
    from adapters.bitfit import save_bitfit

    root = tmp_path_factory.mktemp("zoo")
    m = tiny_base.model
    z = {
        "lora_qv_r4": lora(m, root / "lora_qv_r4", 1, r=4),
        "lora_all_r8_rslora": lora(m, root / "lora_all_r8_rslora", 2, r=8, use_rslora=True,
                                   target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
        "lora_layers_pattern": lora(m, root / "lora_layers_pattern", 3, r=2, target_modules=["q", "k", "wo", "o"],
                                    layers_to_transform=[1, 3], rank_pattern={"wo": 6},
                                    alpha_pattern={"k": 3.0}),
        "lora_regex": lora(m, root / "lora_regex", 4, r=3, target_modules=r".*EncDecAttention\.(q|v)"),
        "ia3_default": ia3(m, root / "ia3_default", 5),  # peft's T5 defaults: k, v, wo (wo feed-forward)
        "ia3_mixed": ia3(m, root / "ia3_mixed", 6, target_modules=["q", "o", "wi_0", "wo"],
                         feedforward_modules=["wi_0", "wo"]),
        "prompt_5": prompt(m, root / "prompt_5", 7, 5),
        "prompt_9_single": prompt(m, root / "prompt_9_single", 8, 9, num_transformer_submodules=1),
    }
    g = torch.Generator().manual_seed(9)
    for name, targets, layers in (("bitfit_attn", ("q", "o"), None), ("bitfit_ffn", ("wo", "wi_1", "v"), [0, 2])):
        biases = {p: 0.5 * torch.randn(shape[1], generator=g) for p, shape in
                  BaseDescription.from_model(m, "t", "t").linear_shapes.items()
                  if p.rsplit(".", 1)[-1] in targets and (layers is None or int(p.split(".")[2]) in layers)}
        z[name] = save_bitfit(root / name, biases, base_model_name_or_path=tiny_base.name,
                              target_modules=list(targets), layers_to_transform=layers)
    return z


def wrap(tiny_base, tiny_desc, zoo, **config):
    """A deep copy of the tiny base with slots attached and every zoo adapter written to its SLOT_OF slot."""
    model = copy.deepcopy(tiny_base.model)
    config.setdefault("slots", {AdapterKind.LORA: 4, AdapterKind.IA3: 2, AdapterKind.BITFIT: 2, AdapterKind.PROMPT: 2})
    slots = attach_slots(model, SlotConfig(max_rank=8, max_virtual_tokens=12, **config))
    for name, (kind, slot) in SLOT_OF.items():
        slots.write(kind, slot, load_adapter(zoo[name], tiny_desc))
    return model, slots


@pytest.fixture(scope="session")
def slot_of() -> dict:
    return SLOT_OF


@pytest.fixture(scope="session")
def wrapped(tiny_base, tiny_desc, zoo):
    """Shared by read-only tests; a test that rewrites a slot restores it before it ends."""
    return wrap(tiny_base, tiny_desc, zoo)


@pytest.fixture(scope="session")
def mixed_batch():
    """(row adapter names, input_ids right-padded, attention_mask, decoder_input_ids, lengths)."""
    g = torch.Generator().manual_seed(0)
    lengths = [3 + (7 * i) % 11 for i in range(len(ROWS))]
    ids = torch.zeros(len(ROWS), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 380, (n,), generator=g)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    dec = torch.randint(3, 380, (len(ROWS), 4), generator=g)
    dec[:, 0] = 0
    return ROWS, ids, mask, dec, lengths


def forward(model, slots, rows, ids, mask, dec):
    """Full forward of a batch the way a server does it: encoder inputs (soft prompts), set_rows, model."""
    with torch.no_grad():
        embeds, enc_mask = slots.encoder_inputs(ids, mask, rows)
        slots.set_rows(rows)
        return model(inputs_embeds=embeds, attention_mask=enc_mask, decoder_input_ids=dec).logits


@pytest.fixture(scope="session")
def run_batch():
    return forward
