"""Several adapters on one row, in ONE batch with single-adapter and base rows: each row's logits equal PEFT's
own computation of its combination (tests/combination_oracle.py) within 1e-4."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterKind, RowAdapters, SlotError, load_adapter
from adapters.combine import MergeOptions, merge_loras
from tests.combination_oracle import model_for

TOL = 1e-4

# per row: None (base) or [(adapter name, weight), ...]
ROWS = [
    None,
    [("lora_qv_r4", 1.0)],
    [("lora_qv_r4", 0.7), ("lora_all_r8_rslora", -0.4)],
    [("lora_all_r8_rslora", 1.0), ("ia3_default", 1.0)],
    [("lora_qv_r4", 1.0), ("prompt_5", 1.0)],
    [("lora_qv_r4", 1.5), ("lora_all_r8_rslora", 0.5), ("ia3_mixed", 1.0)],
    [("lora_qv_r4", 0.5), ("bitfit_ffn", 1.0)],
    [("ia3_default", 1.0)],
    [("lora_qv_r4", 0.7), ("lora_all_r8_rslora", -0.4)],
    [("lora_qv_r4", 2.0)],
    [("ia3_mixed", 1.0), ("prompt_9_single", 1.0), ("lora_all_r8_rslora", 1.0)],
]


def _row(slot_of, row):
    return None if row is None else [(*slot_of[name], w) for name, w in row]


def _batch(n_rows):
    g = torch.Generator().manual_seed(3)
    lengths = [4 + (5 * i) % 9 for i in range(n_rows)]
    ids = torch.zeros(n_rows, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 380, (n,), generator=g)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    dec = torch.randint(3, 380, (n_rows, 4), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec, lengths


def _check_rows(tiny_base, zoo, rows, logits, ids, dec, lengths):
    refs = {}
    for i, row in enumerate(rows):
        key = None if row is None else tuple(row)
        if key not in refs:
            refs[key] = model_for(tiny_base.model, [] if row is None else [(zoo[n], w) for n, w in row])
        ids_i, dec_i = ids[i: i + 1, : lengths[i]], dec[i: i + 1]
        ref = refs[key](ids_i, dec_i)
        diff = (logits[i] - ref[0]).abs().max().item()
        assert diff <= TOL, f"row {i} ({row}): max abs diff {diff}"
    return refs


def test_mixed_batch_of_combinations_matches_peft_per_row(tiny_base, zoo, wrapped, slot_of, run_batch):
    model, slots = wrapped
    ids, mask, dec, lengths = _batch(len(ROWS))
    rows = RowAdapters.from_rows([_row(slot_of, r) for r in ROWS])
    assert rows.combined_lora
    logits = run_batch(model, slots, rows, ids, mask, dec)
    _check_rows(tiny_base, zoo, ROWS, logits, ids, dec, lengths)
    # the combination is not one of its parts: row 2 differs from both of its LoRAs alone
    single = run_batch(model, slots, RowAdapters.from_rows([_row(slot_of, [(n, 1.0)]) for n, _ in ROWS[2]]),
                       ids[[2, 2]], mask[[2, 2]], dec[[2, 2]])
    assert (single - logits[2]).abs().amax(dim=(1, 2)).min() > 1e-2


@pytest.mark.parametrize("pattern", ["one-combination", "two-alternating"])
def test_rows_sharing_a_combination_run_grouped_and_match(tiny_base, zoo, wrapped, slot_of, run_batch, pattern):
    """Rows with the same terms share one grouped GEMM (the `Grouped` path), in order or gathered."""
    from adapters.lora import Grouped

    model, slots = wrapped
    combos = [ROWS[2], ROWS[5]] if pattern == "two-alternating" else [ROWS[2]]
    rows_spec = [combos[i % len(combos)] for i in range(8)]
    ids, mask, dec, lengths = _batch(len(rows_spec))
    rows = RowAdapters.from_rows([_row(slot_of, r) for r in rows_spec])
    logits = run_batch(model, slots, rows, ids, mask, dec)
    layer = slots.layers["decoder.block.0.layer.0.SelfAttention.q"]
    assert isinstance(layer._gathered(torch.float32).post[0][1], Grouped)
    _check_rows(tiny_base, zoo, rows_spec, logits, ids, dec, lengths)


def test_ties_merge_matches_peft_add_weighted_adapter(tiny_base, tiny_desc, zoo, make_wrapped, run_batch,
                                                      tmp_path):
    """The derived LoRA of a ties merge, served from a slot next to base and single-LoRA rows, equals PEFT's
    add_weighted_adapter(combination_type="ties")."""
    from tests.peft_zoo import lora

    a = lora(tiny_base.model, tmp_path / "a", 21, r=4, target_modules=["q", "v", "wo"])
    b = lora(tiny_base.model, tmp_path / "b", 22, r=4, target_modules=["q", "k", "v"], use_rslora=True)
    parts = [load_adapter(a, tiny_desc), load_adapter(b, tiny_desc)]
    options = MergeOptions("ties", density=0.5, majority_sign_method="total")
    merged = merge_loras(parts, [0.8, 0.6], options, "ties(a,b)")
    assert merged.spec.method_name == "ties" and merged.spec.rank == 4
    model, slots = make_wrapped()
    slots.write(AdapterKind.LORA, 5, merged)
    slots.write(AdapterKind.LORA, 4, parts[0])
    rows_spec = [(AdapterKind.LORA, 5), None, (AdapterKind.LORA, 4), (AdapterKind.LORA, 5)]
    ids, mask, dec, lengths = _batch(len(rows_spec))
    logits = run_batch(model, slots, RowAdapters.from_pairs(rows_spec), ids, mask, dec)
    ties_ref = model_for(tiny_base.model, [(a, 0.8), (b, 0.6)], strategy="ties", density=0.5,
                         majority_sign_method="total")
    linear_ref = model_for(tiny_base.model, [(a, 0.8), (b, 0.6)])
    for i, spec in enumerate(rows_spec):
        ids_i, dec_i = ids[i: i + 1, : lengths[i]], dec[i: i + 1]
        ref = (ties_ref if spec == (AdapterKind.LORA, 5) else model_for(tiny_base.model, [(a, 1.0)] if spec else []))
        diff = (logits[i] - ref(ids_i, dec_i)[0]).abs().max().item()
        assert diff <= TOL, f"row {i}: {diff}"
    # ties trims and elects signs: it is not the exact weighted sum
    assert (linear_ref(ids[:1, :lengths[0]], dec[:1]) - logits[0]).abs().max() > 1e-3


def test_dare_is_reproducible_from_its_seed(tiny_desc, zoo):
    parts = [load_adapter(zoo["lora_qv_r4"], tiny_desc)]
    options = MergeOptions("dare_linear", density=0.5)
    one = merge_loras([parts[0]], [1.0], options, "d", seed=7)
    two = merge_loras([parts[0]], [1.0], options, "d", seed=7)
    other = merge_loras([parts[0]], [1.0], options, "d", seed=8)
    module = next(iter(one.a))
    assert torch.equal(one.a[module], two.a[module]) and torch.equal(one.b[module], two.b[module])
    assert not torch.equal(one.a[module], other.a[module])


def test_slot_api_refuses_rows_it_cannot_take(wrapped, slot_of):
    with pytest.raises(SlotError, match="at most one adapter of each kind"):
        RowAdapters.from_rows([[(AdapterKind.IA3, 0), (AdapterKind.IA3, 1)]])
    with pytest.raises(SlotError, match="takes no weight"):
        RowAdapters.from_rows([[(AdapterKind.IA3, 0, 0.5)]])
    model, slots = wrapped
    dora = slot_of["dora_qv_r4"]
    rows = RowAdapters.from_rows([[(*dora, 1.0), (*slot_of["lora_qv_r4"], 1.0)]])
    slots.set_rows(rows)
    with pytest.raises(SlotError, match="DoRA"):
        model(input_ids=torch.tensor([[5, 6, 7]]), decoder_input_ids=torch.tensor([[0]]))
    slots.set_rows(None)
