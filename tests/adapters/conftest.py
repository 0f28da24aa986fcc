"""A zoo of real PEFT adapters (random, non-trivial weights) saved with save_pretrained on the tiny base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters import AdapterKind, BaseDescription, SlotConfig, attach_slots, load_adapter
from tests.peft_zoo import adalora, dora, ia3, lora, prefix, prompt, ptuning

SLOT_OF = {  # adapter name -> (kind, slot)
    "lora_qv_r4": (AdapterKind.LORA, 0), "lora_all_r8_rslora": (AdapterKind.LORA, 1),
    "lora_layers_pattern": (AdapterKind.LORA, 2), "lora_regex": (AdapterKind.LORA, 3),
    "ia3_default": (AdapterKind.IA3, 0), "ia3_mixed": (AdapterKind.IA3, 1),
    "bitfit_attn": (AdapterKind.BITFIT, 0), "bitfit_ffn": (AdapterKind.BITFIT, 1),
    "prompt_5": (AdapterKind.PROMPT, 0), "prompt_9_single": (AdapterKind.PROMPT, 1),
    "dora_qv_r4": (AdapterKind.LORA, 4), "adalora_pruned": (AdapterKind.LORA, 5),
    "ptune_mlp": (AdapterKind.PROMPT, 2), "ptune_lstm_single": (AdapterKind.PROMPT, 3),
}

# Rows of the batch: every adapter once, two base rows, and a repeated adapter.
ROWS = [None, "lora_qv_r4", "ia3_default", "prompt_5", "bitfit_attn", "lora_all_r8_rslora", "ia3_mixed",
        "prompt_9_single", "bitfit_ffn", "lora_layers_pattern", None, "lora_regex", "lora_qv_r4", "prompt_5",
        "dora_qv_r4", "adalora_pruned", "ptune_mlp", "dora_qv_r4", "ptune_lstm_single"]


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
        "dora_qv_r4": dora(m, root / "dora_qv_r4", 10, r=4, target_modules=["q", "v", "wi_0"]),
        "adalora_pruned": adalora(m, root / "adalora_pruned", 11),
        "ptune_mlp": ptuning(m, root / "ptune_mlp", 12, 6),
        "ptune_lstm_single": ptuning(m, root / "ptune_lstm_single", 13, 3, encoder="LSTM",
                                     num_transformer_submodules=1),
        # served in the engine's decode step (tests/serve/test_engine_all_kinds.py); here: format checks
        "prefix_6": prefix(m, root / "prefix_6", 14, 6),
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
    config.setdefault("slots", {AdapterKind.LORA: 6, AdapterKind.IA3: 2, AdapterKind.BITFIT: 2, AdapterKind.PROMPT: 4})
    slots = attach_slots(model, SlotConfig(max_rank=8, max_virtual_tokens=12, **config))
    for name, (kind, slot) in SLOT_OF.items():
        if slot < slots.config.count(kind):
            slots.write(kind, slot, load_adapter(zoo[name], tiny_desc))
    return model, slots


@pytest.fixture(scope="session")
def make_wrapped(tiny_base, tiny_desc, zoo):
    return lambda **config: wrap(tiny_base, tiny_desc, zoo, **config)


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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny base's ops are microseconds long: on a shared CI box, OpenMP hand-offs between threads cost
    more than the math. One thread per test here; restored afterwards for the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
