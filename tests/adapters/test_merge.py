"""Merging: merged outputs equal unmerged ones; unmerge restores bit-identical base weights."""

from __future__ import annotations

import copy
import hashlib
import random

import pytest
import torch

from adapters import AdapterKind, RowAdapters, SlotError, load_adapter


def weights_hash(slots) -> str:
    h = hashlib.sha256()
    for path, layer in sorted(slots.layers.items()):
        h.update(path.encode())
        h.update(layer.weight.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def merging(make_wrapped):
    return make_wrapped()


@pytest.mark.parametrize("name", ["lora_all_r8_rslora", "lora_layers_pattern", "ia3_default", "ia3_mixed",
                                  "bitfit_ffn", "bitfit_attn", "dora_qv_r4", "adalora_pruned"])
def test_merged_equals_unmerged_and_unmerge_is_exact(merging, mixed_batch, slot_of, run_batch, name):
    model, slots = merging
    _, ids, mask, dec, _ = mixed_batch
    n = len(ids)
    before = weights_hash(slots)
    base = run_batch(model, slots, RowAdapters.base(n), ids, mask, dec)
    unmerged = run_batch(model, slots, RowAdapters.from_pairs([slot_of[name]] * n), ids, mask, dec)
    assert (unmerged - base).abs().max() > 1e-2
    slots.merge(*slot_of[name])
    try:
        merged = run_batch(model, slots, RowAdapters.base(n), ids, mask, dec)
    finally:
        slots.unmerge()
    assert (merged - unmerged).abs().max().item() <= 1e-4
    assert weights_hash(slots) == before
    assert torch.equal(run_batch(model, slots, RowAdapters.base(n), ids, mask, dec), base)


def test_merge_misuse_is_refused(merging, slot_of, tiny_desc, zoo):
    _, slots = merging
    kind, slot = slot_of["ia3_default"]
    slots.merge(kind, slot)
    try:
        with pytest.raises(SlotError, match="already merged"):
            slots.merge(*slot_of["lora_qv_r4"])
        with pytest.raises(SlotError, match="merged into the base"):
            slots.set_rows(RowAdapters.from_pairs([(kind, slot)]))
        with pytest.raises(SlotError, match="merged into the base"):
            slots.write(kind, slot, load_adapter(zoo["ia3_mixed"], tiny_desc))
    finally:
        slots.unmerge()
    with pytest.raises(SlotError, match="cannot be merged"):
        slots.merge(*slot_of["prompt_5"])


def test_ten_thousand_random_ia3_merge_cycles_leave_base_bit_identical(make_wrapped, tmp_path, tiny_base,
                                                                       tiny_desc):
    from peft import IA3Config, get_peft_model

    model, slots = make_wrapped(slots={AdapterKind.IA3: 3})
    # small adapters (one block each, regex targets): merge/unmerge touch only their tensors
    for slot, (targets, ff) in enumerate([("k", "none"), ("wo", "wo"), ("o", "none")]):
        torch.manual_seed(slot)
        pm = get_peft_model(copy.deepcopy(tiny_base.model), IA3Config(
            task_type="SEQ_2_SEQ_LM", target_modules=rf"encoder\.block\.{slot}\..*\.({targets})",
            feedforward_modules=rf".*\.({ff})", init_ia3_weights=False))
        pm.save_pretrained(tmp_path / f"ia3_{slot}")
        slots.write(AdapterKind.IA3, slot, load_adapter(tmp_path / f"ia3_{slot}", tiny_desc))
    before = weights_hash(slots)
    changed = cycles(slots, random.Random(0), 10_000)
    assert changed == 3
    assert weights_hash(slots) == before


def cycles(slots, rng, n: int) -> int:
    """n random merge/unmerge cycles; checks on the first few that merging really changes weights."""
    changed = 0
    for _ in range(n):
        slot = rng.randrange(3)
        if changed < 3:
            layer = next(lay for lay in slots.layers.values() if lay.slots["ia3"].touches(slot + 1))
            w0 = layer.weight.detach().clone()
        slots.merge(AdapterKind.IA3, slot)
        if changed < 3:
            assert not torch.equal(w0, layer.weight)
            changed += 1
        slots.unmerge()
    return changed
