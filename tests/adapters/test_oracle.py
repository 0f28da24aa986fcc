"""Oracle: ONE batch mixing rows of all four kinds plus base rows; each row's logits equal peft's own
PeftModel for that adapter run alone (BitFit: a dense reference with forward hooks)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import AdapterKind, RowAdapters, SlotConfig, attach_slots, load_adapter

TOL = 1e-4
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


def peft_logits(base_model, adapter_dir, ids, dec):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
    cfg = pm.peft_config["default"]
    with torch.no_grad():
        if cfg.peft_type.value == "PROMPT_TUNING" and cfg.num_transformer_submodules == 2:
            # peft's generate: only the encoder half of the prompt, before the input (forward would also
            # prepend the decoder half to the decoder input)
            n = cfg.num_virtual_tokens
            embeds = torch.cat((pm.get_prompt(batch_size=1)[:, :n], pm.word_embeddings(ids)), dim=1)
            return pm.base_model(inputs_embeds=embeds, decoder_input_ids=dec).logits
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits


def bitfit_logits(base_model, adapter_dir, ids, dec):
    from safetensors.torch import load_file

    model = copy.deepcopy(base_model)
    biases = {k[len("base_model.model."):-len(".bias")]: v
              for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    for path, bias in biases.items():
        model.get_submodule(path).register_forward_hook(lambda mod, inp, out, b=bias: out + b)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits


@pytest.fixture(scope="module")
def batch(tiny_base):
    g = torch.Generator().manual_seed(0)
    lengths = [3 + (7 * i) % 11 for i in range(len(ROWS))]
    ids = torch.zeros(len(ROWS), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 380, (n,), generator=g)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    dec = torch.randint(3, 380, (len(ROWS), 4), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec, lengths


@pytest.fixture(scope="module")
def wrapped(tiny_base, tiny_desc, zoo):
    model = copy.deepcopy(tiny_base.model)
    slots = attach_slots(model, SlotConfig(slots={AdapterKind.LORA: 4, AdapterKind.IA3: 2, AdapterKind.BITFIT: 2,
                                                  AdapterKind.PROMPT: 2}, max_rank=8, max_virtual_tokens=12))
    for name, (kind, slot) in SLOT_OF.items():
        slots.write(kind, slot, load_adapter(zoo[name], tiny_desc))
    return model, slots


def test_mixed_batch_matches_peft_per_row(tiny_base, zoo, batch, wrapped):
    ids, mask, dec, lengths = batch
    model, slots = wrapped
    rows = RowAdapters.from_pairs([None if r is None else SLOT_OF[r] for r in ROWS])
    with torch.no_grad():
        embeds, enc_mask = slots.encoder_inputs(ids, mask, rows)
        slots.set_rows(rows)
        logits = model(inputs_embeds=embeds, attention_mask=enc_mask, decoder_input_ids=dec).logits
    for i, name in enumerate(ROWS):
        ids_i, dec_i = ids[i: i + 1, : lengths[i]], dec[i: i + 1]
        if name is None:
            with torch.no_grad():
                ref = tiny_base.model(input_ids=ids_i, decoder_input_ids=dec_i).logits
        elif name.startswith("bitfit"):
            ref = bitfit_logits(tiny_base.model, zoo[name], ids_i, dec_i)
        else:
            ref = peft_logits(tiny_base.model, zoo[name], ids_i, dec_i)
        diff = (logits[i] - ref[0]).abs().max().item()
        assert diff <= TOL, f"row {i} ({name}): max abs diff {diff}"
        if name is not None:  # the adapter really changes the output (a test that cannot fail is a defect)
            with torch.no_grad():
                plain = tiny_base.model(input_ids=ids_i, decoder_input_ids=dec_i).logits
            assert (plain - ref).abs().max() > 1e-2, f"{name} barely changes the logits"
