"""The fast paths give the same numbers as the plain ones: reused LoRA row buffers when a few rows change
(continuous batching), rows sharing a LoRA adapter grouped into one GEMM, BitFit fused into the decode GEMM,
one-call slot writes (rank shrink zeroes the tail)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters import AdapterKind, AdapterSpec, BitFitWeights, LoraWeights, RowAdapters
from adapters.bitfit import BitFitSlots
from adapters.layer import AdaptedLinear, BatchState
from adapters.lora import Grouped, LoraSlots, PerRow, group_rows

IN, OUT, RANK, SLOTS = 8, 6, 4, 6


def spec(kind: AdapterKind, i: int, rank=None) -> AdapterSpec:
    return AdapterSpec(name=f"{kind}-{i}", kind=kind, rank=rank, targets=("q",), num_virtual_tokens=None,
                       size_bytes=0, base_model=None, path="", modules=("q",))


def lora(i: int, r: int = RANK, seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(100 * seed + i)
    return LoraWeights(spec(AdapterKind.LORA, i, r), {"q": torch.randn(r, IN, generator=g)},
                       {"q": torch.randn(OUT, r, generator=g)})


def layer(cache: bool = True) -> AdaptedLinear:
    torch.manual_seed(0)
    kinds = {AdapterKind.LORA: LoraSlots(SLOTS, IN, OUT, RANK, torch.float32, "cpu"),
             AdapterKind.BITFIT: BitFitSlots(SLOTS, OUT, torch.float32, "cpu")}
    wrapped = AdaptedLinear(nn.Linear(IN, OUT, bias=False), "q", BatchState(), kinds, cache_gathered=cache)
    for i in range(SLOTS):
        kinds[AdapterKind.LORA].write(i + 1, lora(i), "q")
    return wrapped


def run(m: AdaptedLinear, slots: list[int | None], x: torch.Tensor) -> torch.Tensor:
    m.batch.rows = RowAdapters.from_pairs([None if s is None else (AdapterKind.LORA, s) for s in slots])
    m.batch.bump()
    with torch.no_grad():
        return m(x[: len(slots)])


def test_lora_rows_reused_across_row_changes_equal_a_fresh_gather(monkeypatch):
    import adapters.lora as lora_mod

    reused, original = [], lora_mod._regather_changed
    monkeypatch.setattr(lora_mod, "_regather_changed", lambda *a: reused.append(original(*a)) or reused[-1])
    fast, fresh = layer(cache=True), layer(cache=False)
    x = torch.randn(6, 1, IN)
    # a continuous batch over time: a row leaves and the last moves in, one joins, the batch shrinks and grows
    for rows in ([0, 1, 2, 3], [3, 1, 2], [3, 1, 2, 5], [3, 1], [3, 1, 4, 0, 2], [3, 1, 4, 0, 2]):
        assert torch.equal(run(fast, rows, x), run(fresh, rows, x)), rows
    assert fast.slots["lora"]._last is not None and fresh.slots["lora"]._last is None  # no memory without cache
    assert sum(r is not None for r in reused) >= 4  # the reuse path ran (leave, join, shrink, unchanged)


def test_slot_rewrite_under_unchanged_rows_is_not_served_from_reused_rows():
    fast, fresh = layer(), layer(cache=False)
    x = torch.randn(4, 1, IN)
    before = run(fast, [0, 1, 2, 3], x)
    for m in (fast, fresh):
        m.slots["lora"].write(2, lora(1, seed=7), "q")  # slot index 2 = adapter slot 1
    after = run(fast, [0, 1, 2, 3], x)
    assert torch.equal(after, run(fresh, [0, 1, 2, 3], x))
    assert not torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])


def test_slot_rewrite_while_another_row_changes_regathers_the_rewritten_rows(monkeypatch):
    import adapters.lora as lora_mod

    reused, original = [], lora_mod._regather_changed
    monkeypatch.setattr(lora_mod, "_regather_changed", lambda *a: reused.append(original(*a)) or reused[-1])
    fast, fresh = layer(), layer(cache=False)
    x = torch.randn(6, 1, IN)
    run(fast, [0, 1, 2, 3, 4], x)
    for m in (fast, fresh):
        m.slots["lora"].write(2, lora(1, seed=7), "q")
    got = run(fast, [0, 1, 2, 3, 5], x)
    assert reused[-1] is not None  # the partial path ran: only row 1 (rewritten slot) and row 4 (new) were copied
    assert torch.equal(got, run(fresh, [0, 1, 2, 3, 5], x))


def test_slot_writes_land_in_the_buffers_after_the_module_is_converted():
    s = LoraSlots(2, IN, OUT, RANK, torch.float32, "cpu").double()  # .to()/.cuda() replace buffers the same way
    w = lora(0)
    s.write(1, w, "q")
    assert s.a.dtype == torch.float64 and torch.allclose(s.a[1], w.a["q"].T.double())


def test_rank_shrink_zeroes_the_old_tail_and_lists_equal_the_weights():
    s = LoraSlots(2, IN, OUT, RANK, torch.float32, "cpu")
    s.write(1, lora(0, r=RANK), "q")
    small = lora(1, r=2)
    s.write(1, small, "q")
    assert torch.equal(s.a[1, :, :2], small.a["q"].T) and torch.equal(s.b[1, :2], small.b["q"].T)
    assert not s.a[1, :, 2:].any() and not s.b[1, 2:].any() and s.rank[1] == 2
    s.clear(1)
    assert not s.a[1].any() and not s.b[1].any()


@pytest.mark.parametrize("tokens", [1, 3])
def test_bitfit_bias_in_the_gemm_equals_base_plus_bias(tokens):
    m = layer()
    bias = torch.randn(OUT)
    m.slots["bitfit"].write(1, BitFitWeights(spec(AdapterKind.BITFIT, 0), {"q": bias}), "q")
    m.batch.rows = RowAdapters.from_pairs([(AdapterKind.BITFIT, 0), None, (AdapterKind.LORA, 2)])
    m.batch.bump()
    x = torch.randn(3, tokens, IN)
    with torch.no_grad():
        y = m(x)
        base = m.base_layer(x)
        lora_row = base[2] + x[2] @ m.slots["lora"].a[3] @ m.slots["lora"].b[3]
    torch.testing.assert_close(y[0], base[0] + bias)
    assert torch.equal(y[1], base[1]) or torch.allclose(y[1], base[1], atol=1e-6)
    torch.testing.assert_close(y[2], lora_row)


def test_group_rows_packs_shared_adapters_and_splits_popular_ones():
    assert group_rows((5, 5, 5, 5)) == ((5,), (0, 1, 2, 3), (True,) * 4, 4)
    slots, places, real, size = group_rows((1, 2, 1, 2, 1, 2, 1, 2))
    assert (slots, size, all(real)) == ((1, 2), 4, True) and sorted(places) == list(range(8))
    # one popular adapter (6 rows) and two others: groups of the mean size 3, padding repeats a real row
    slots, places, real, size = group_rows((7, 7, 7, 7, 7, 7, 8, 9, 9))
    assert size == 3 and slots == (7, 7, 8, 9) and real.count(False) == 3
    assert sorted(p for p, ok in zip(places, real, strict=True) if ok) == list(range(9))
    assert group_rows((1, 2, 3, 4)) is None and group_rows((1, 1, 2, 3)) is None  # mostly distinct


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("rows", [
    [2, 2, 2, 2, 2, 2],  # one adapter for every row
    [1, 4, 1, 4, 1, 4],  # two adapters, equal groups
    [3, 3, 3, 3, 3, 3, 0, None, 5, 3, 3],  # a popular adapter split over groups, a base row, padding
])
def test_grouped_rows_equal_per_row_dense_math(rows, tokens, monkeypatch):
    import adapters.lora as lora_mod

    seen, original = [], LoraSlots.gather
    monkeypatch.setattr(lora_mod.LoraSlots, "gather", lambda *a: seen.append(original(*a)) or seen[-1])
    m = layer(cache=False)
    x = torch.randn(len(rows), tokens, IN)
    m.batch.rows = RowAdapters.from_pairs([None if s is None else (AdapterKind.LORA, s) for s in rows])
    m.batch.bump()
    with torch.no_grad():
        y = m(x)
        base = m.base_layer(x)
    assert isinstance(seen[-1], Grouped)
    lora_slots = m.slots["lora"]
    for i, s in enumerate(rows):
        want = base[i] if s is None else base[i] + x[i] @ lora_slots.a[s + 1] @ lora_slots.b[s + 1]
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-5)


def test_distinct_adapters_take_the_per_row_path(monkeypatch):
    import adapters.lora as lora_mod

    seen, original = [], LoraSlots.gather
    monkeypatch.setattr(lora_mod.LoraSlots, "gather", lambda *a: seen.append(original(*a)) or seen[-1])
    run(layer(), [0, 1, 2, 3], torch.randn(4, 1, IN))
    assert isinstance(seen[-1], PerRow) and seen[-1].rows is None
