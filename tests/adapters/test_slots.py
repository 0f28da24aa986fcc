"""Slot API behaviour: decode with a KV cache reuses gathered weights, slot rewrites take effect,
identity rows equal the base, misuse gets a SlotError that says what to do."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import AdapterKind, RowAdapters, SlotConfig, SlotError, attach_slots, load_adapter
from adapters.lora import LoraSlots


def rows_of(names, slot_of):
    return RowAdapters.from_pairs([None if n is None else slot_of[n] for n in names])


def test_decode_steps_with_kv_cache_equal_full_forward_and_gather_once(wrapped, mixed_batch, slot_of, run_batch,
                                                                          monkeypatch):
    model, slots = wrapped
    names, ids, mask, dec, _ = mixed_batch
    rows = rows_of(names, slot_of)
    full = run_batch(model, slots, rows, ids, mask, dec)
    calls = []
    original = LoraSlots.gather
    monkeypatch.setattr(LoraSlots, "gather", lambda self, *a: calls.append(1) or original(self, *a))
    slots.set_rows(None)  # as a server would between batches; forces a fresh gather below
    with torch.no_grad():
        embeds, enc_mask = slots.encoder_inputs(ids, mask, rows)
        slots.set_rows(rows)
        enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask)
        past, steps = None, []
        for t in range(dec.shape[1]):
            slots.set_rows(rows)  # same mapping every step: no new gathers
            out = model(encoder_outputs=enc, attention_mask=enc_mask, decoder_input_ids=dec[:, t:t + 1],
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
            if t == 0:
                gathers_after_first_step = len(calls)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert gathers_after_first_step > 0 and len(calls) == gathers_after_first_step


def test_rewriting_a_slot_takes_effect_and_clear_gives_base(wrapped, mixed_batch, slot_of, run_batch, tiny_base,
                                                            tiny_desc, zoo):
    model, slots = wrapped
    names, ids, mask, dec, _ = mixed_batch
    pick = [1, 11]  # rows using lora_qv_r4 (slot 0) and lora_regex (slot 3)
    sub = [names[i] for i in pick]
    assert sub == ["lora_qv_r4", "lora_regex"]
    rows = rows_of(sub, slot_of)
    args = (ids[pick], mask[pick], dec[pick])
    before = run_batch(model, slots, rows, *args)
    try:
        slots.write(AdapterKind.LORA, 0, load_adapter(zoo["lora_regex"], tiny_desc))  # same rows, new contents
        after = run_batch(model, slots, rows, *args)
        assert not torch.allclose(after[0], before[0], atol=1e-3)
        ref = run_batch(model, slots, rows_of(["lora_regex"], slot_of), *(a[:1] for a in args))
        assert torch.allclose(after[0], ref[0], atol=1e-5)
        slots.clear(AdapterKind.LORA, 0)
        cleared = run_batch(model, slots, rows, *args)
        base = run_batch(model, slots, RowAdapters.base(2), *args)
        assert torch.allclose(cleared[0], base[0], atol=1e-6)
    finally:
        slots.write(AdapterKind.LORA, 0, load_adapter(zoo["lora_qv_r4"], tiny_desc))
    assert torch.allclose(run_batch(model, slots, rows, *args), before, atol=1e-6)


def test_base_rows_and_no_rows_equal_unwrapped_model(wrapped, mixed_batch, run_batch, tiny_base):
    model, slots = wrapped
    _, ids, mask, dec, _ = mixed_batch
    with torch.no_grad():
        ref = tiny_base.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(run_batch(model, slots, RowAdapters.base(len(ids)), ids, mask, dec), ref)
    slots.set_rows(None)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref)


def test_left_padded_prompt_rows_equal_right_padded(wrapped, mixed_batch, slot_of, run_batch):
    model, slots = wrapped
    names, ids, mask, dec, lengths = mixed_batch
    rows = rows_of(names, slot_of)
    right = run_batch(model, slots, rows, ids, mask, dec)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(lengths):
        left_ids[i, ids.shape[1] - n:] = ids[i, :n]
        left_mask[i, ids.shape[1] - n:] = 1
    assert torch.allclose(run_batch(model, slots, rows, left_ids, left_mask, dec), right, atol=1e-5)


def test_state_dict_and_description_unchanged_by_wrapping(wrapped, tiny_base, tiny_desc):
    model, slots = wrapped
    assert slots.describe(tiny_desc.name, tiny_desc.fingerprint) == tiny_desc
    keys = {k.replace(".base_layer.", ".") for k in model.state_dict()}
    assert keys == set(tiny_base.model.state_dict())


@pytest.mark.parametrize("pairs, match", [
    ([(AdapterKind.LORA, 6)], "out of range"),
    ([(AdapterKind.PROMPT, 7)], "out of range"),
    ([("adapter", 0)], "expected"),
    ([(AdapterKind.IA3, -1)], "negative"),
])
def test_bad_rows_are_refused(wrapped, pairs, match):
    _, slots = wrapped
    with pytest.raises(SlotError, match=match):
        slots.set_rows(RowAdapters.from_pairs(pairs))


def test_row_count_mismatch_says_to_call_set_rows(wrapped, mixed_batch):
    model, slots = wrapped
    _, ids, mask, dec, _ = mixed_batch
    slots.set_rows(RowAdapters.from_pairs([(AdapterKind.LORA, 0)]))
    with pytest.raises(SlotError, match="set_rows"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    slots.set_rows(None)


def test_writing_wrong_kind_or_too_large_is_refused(wrapped, tiny_base, tiny_desc, zoo):
    _, slots = wrapped
    with pytest.raises(SlotError, match="is a lora adapter"):
        slots.write(AdapterKind.IA3, 0, load_adapter(zoo["lora_qv_r4"], tiny_desc))
    small = attach_slots(copy.deepcopy(tiny_base.model), SlotConfig(slots={AdapterKind.LORA: 1}, max_rank=2))
    with pytest.raises(SlotError, match="max_rank"):
        small.write(AdapterKind.LORA, 0, load_adapter(zoo["lora_all_r8_rslora"], tiny_desc))
    with pytest.raises(SlotError, match="already has adapter slots"):
        attach_slots(small.model, SlotConfig(slots={AdapterKind.LORA: 1}))
