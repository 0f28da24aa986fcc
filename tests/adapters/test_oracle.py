"""Oracle: ONE batch mixing rows of all four kinds plus base rows; each row's logits equal peft's own
PeftModel for that adapter run alone (BitFit: a dense reference with forward hooks)."""

from __future__ import annotations

import copy

import torch

from adapters import RowAdapters
from tests.combination_oracle import add_bitfit

TOL = 1e-4
def peft_logits(base_model, adapter_dir, ids, dec):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
    cfg = pm.peft_config["default"]
    with torch.no_grad():
        if cfg.peft_type.value in ("PROMPT_TUNING", "P_TUNING") and cfg.num_transformer_submodules == 2:
            # peft's generate: only the encoder half of the prompt, before the input (forward would also
            # prepend the decoder half to the decoder input)
            n = cfg.num_virtual_tokens
            embeds = torch.cat((pm.get_prompt(batch_size=1)[:, :n], pm.word_embeddings(ids)), dim=1)
            return pm.base_model(inputs_embeds=embeds, decoder_input_ids=dec).logits
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits


def bitfit_logits(base_model, adapter_dir, ids, dec):
    model = copy.deepcopy(base_model)
    add_bitfit(model, adapter_dir)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits




def test_mixed_batch_matches_peft_per_row(tiny_base, zoo, mixed_batch, wrapped, slot_of, run_batch):
    names, ids, mask, dec, lengths = mixed_batch
    model, slots = wrapped
    rows = RowAdapters.from_pairs([None if r is None else slot_of[r] for r in names])
    logits = run_batch(model, slots, rows, ids, mask, dec)
    for i, name in enumerate(names):
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


def test_two_submodule_prompt_greedy_tokens_equal_peft_generate(tiny_base, zoo, wrapped, slot_of, mixed_batch,
                                                                run_batch):
    """prompt_5 was saved with num_transformer_submodules=2: served as peft's generate uses it."""
    from peft import PeftModel

    model, slots = wrapped
    _, ids, mask, _, lengths = mixed_batch
    rows = RowAdapters.from_pairs([slot_of["prompt_5"], None, slot_of["prompt_5"]])
    ids, mask = ids[[1, 2, 3]], mask[[1, 2, 3]]

    def greedy(rows):
        dec = torch.zeros(3, 1, dtype=torch.long)
        for _ in range(6):  # full forward each step
            nxt = run_batch(model, slots, rows, ids, mask, dec)[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat((dec, nxt), 1)
        return dec

    dec = greedy(rows)
    assert not torch.equal(dec[0], greedy(RowAdapters.base(3))[0])  # the prompt matters
    pm = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(zoo["prompt_5"])).eval()
    assert pm.peft_config["default"].num_transformer_submodules == 2
    with torch.no_grad():
        for row in (0, 2):
            n = lengths[[1, 2, 3][row]]
            ref = pm.generate(input_ids=ids[row: row + 1, :n], attention_mask=mask[row: row + 1, :n],
                              max_new_tokens=6, do_sample=False)[0]
            assert dec[row, : len(ref)].tolist() == ref.tolist()
