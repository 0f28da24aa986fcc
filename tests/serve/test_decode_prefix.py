"""The decode step's prefix attention, logit by logit: rows with different prefixes (and none) in one batch,
teacher-forced through several steps at different positions; every row's full logits within 1e-4 of peft's
own forward for that prefix alone (its generate would drop the prefix)."""

from __future__ import annotations

import copy

import torch

from adapters import (
    AdapterKind,
    BaseDescription,
    RowAdapters,
    SlotConfig,
    attach_slots,
    encoder_embedding,
    load_adapter,
)
from serve.engine.decode import KVCache, T5Parts, decode_step, encode, prefill_cross
from tests.peft_zoo import prefix

TOL = 1e-4


def test_prefix_rows_logits_equal_peft_forward(tiny_base, tmp_path):
    from peft import PeftModel

    base, tok = tiny_base.model, tiny_base.tokenizer
    adapters = {"p3": prefix(base, tmp_path / "p3", 61, 3),
                "p7_proj": prefix(base, tmp_path / "p7", 62, 7, prefix_projection=True, encoder_hidden_size=32)}
    desc = BaseDescription.from_model(base, tiny_base.name, tiny_base.fingerprint)
    model = copy.deepcopy(base)
    slots = attach_slots(model, SlotConfig(slots={AdapterKind.PREFIX: 2}, max_prefix_tokens=8))
    for slot, name in enumerate(adapters):
        slots.write(AdapterKind.PREFIX, slot, load_adapter(adapters[name], desc))
    rows = ["p3", None, "p7_proj", "p3"]
    texts = ["a prefix row", "a base row in between", "the projected prefix", "short"]
    enc = tok(texts, return_tensors="pt", padding=True)
    parts = T5Parts.of(model)
    cache = KVCache(parts, max_rows=4, max_target=8, max_source=enc.input_ids.shape[1], max_prefix=8)
    hidden = encode(parts, encoder_embedding(model)(enc.input_ids), enc.attention_mask)
    prefill_cross(parts, cache, [0, 1, 2, 3], hidden, enc.attention_mask)
    cache.set_prefixes(0, 4, slots.decoder_prefixes(RowAdapters.from_pairs(
        [None if name is None else (AdapterKind.PREFIX, list(adapters).index(name)) for name in rows])))
    assert cache.prefix_len[:4] == [3, 0, 7, 3]
    # teacher-forced decoder inputs; row 3 starts two steps later (a different position in the same step)
    g = torch.Generator().manual_seed(1)
    dec = torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.randint(3, 250, (4, 5), generator=g)], 1)
    start = [0, 0, 0, 2]
    refs = {}
    with torch.no_grad():
        for r, name in enumerate(rows):
            ids = tok([texts[r]], return_tensors="pt").input_ids
            if name is None:
                refs[r] = base(input_ids=ids, decoder_input_ids=dec[r: r + 1]).logits[0]
            else:
                pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[name])).eval()
                refs[r] = pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec[r: r + 1]).logits[0]
    for step in range(4):
        positions = torch.tensor([max(step - s, 0) for s in start])
        logits = decode_step(parts, cache, dec[torch.arange(4), positions], positions)
        for r in range(4):
            if step < start[r]:
                continue
            diff = (logits[r] - refs[r][positions[r]]).abs().max().item()
            assert diff <= TOL, f"row {r} ({rows[r]}) step {step}: {diff}"
    with torch.no_grad():
        plain = base(input_ids=tok([texts[0]], return_tensors="pt").input_ids, decoder_input_ids=dec[:1]).logits[0]
    assert (plain - refs[0]).abs().max() > 1e-2  # the prefix matters
