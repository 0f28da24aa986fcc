"""Every AdapterHub kind served per row against AdapterHub 1.3's own cached `generate` (the committed
fixtures, tests/adapterhub/fixtures; regenerate with make_fixtures.py in the oracle venv).

- logits: every case of a base (all its adapters on every prompt, plus base rows) in ONE batch, teacher-forced
  through AdapterHub's greedy tokens, half the rows joining two steps late (other decoder positions in the
  same step); each step's full logits within 1e-4 of AdapterHub's, and its argmax AdapterHub's token;
- tokens: the same cases through the Engine's continuous batch (staggered submissions), tokens exactly.

The prefix adapters include every form of AdapterHub's shared pool keys that tools write (POOL_FORMS): the first
attention layer's, the model-level key's, and the name `safetensors.torch.save_model` keeps.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
import torch

from adapters import AdapterKind, BaseDescription, RowAdapters, SlotConfig, attach_slots, load_adapter
from serve.engine.decode import KVCache, T5Parts, decode_step, encode, prefill_cross
from tests.serve.engine_helpers import staggered

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4
LATE = 2  # odd rows join this many steps after the even ones
POOL_FORMS = {"prefix_tuning", "prefix_model_level", "mam_model_level", "prefix_save_model"}  # base_gated's


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="module")
def logits_ref() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "expected_logits.safetensors"))


def _bases(expected) -> list[str]:
    return sorted(expected["bases"])


def _served_rows(expected, base_name: str):
    """(model with slots attached, RowAdapters-able pair per adapter name, kinds seen)."""
    from serve.engine.base import load_base

    base = load_base(str(FIXTURES / expected["bases"][base_name]["dir"]))
    desc = BaseDescription.from_model(base.model, base.name, base.fingerprint)
    names = [n for n, a in expected["adapters"].items() if a["base"] == base_name]
    weights = {n: load_adapter(FIXTURES / expected["adapters"][n]["dir"], desc) for n in names}
    counts: dict[AdapterKind, int] = {}
    pairs = {}
    for n, w in weights.items():
        kind = w.spec.kind
        pairs[n] = (kind, counts.get(kind, 0))
        counts[kind] = counts.get(kind, 0) + 1
    model = copy.deepcopy(base.model)
    slots = attach_slots(model, SlotConfig(slots=counts, max_rank=16, max_prefix_tokens=8, max_bottleneck=64))
    for n, w in weights.items():
        slots.write(pairs[n][0], pairs[n][1], w)
    return base, model, slots, pairs


@pytest.mark.parametrize("base_name", ["base_gated", "base_relu"])
def test_mixed_batch_logits_match_adapterhub_generate(expected, logits_ref, base_name):
    if base_name not in expected["bases"]:
        pytest.skip(f"no {base_name} in the fixtures")
    base, model, slots, pairs = _served_rows(expected, base_name)
    cases = [c for c in expected["cases"] if c["base"] == base_name]
    kinds = {pairs[c["adapter"]][0] for c in cases if c["adapter"]}
    assert AdapterKind.ADAPTERHUB in kinds  # the family's own kind is exercised, not only plain LoRA/(IA)3
    if base_name == "base_gated":
        assert POOL_FORMS <= {c["adapter"] for c in cases if c["logits"]}
    prompts = [p["input_ids"] for p in expected["prompts"]]
    n = len(cases)
    width = max(len(prompts[c["prompt"]]) for c in cases)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for r, c in enumerate(cases):
        p = prompts[c["prompt"]]
        ids[r, :len(p)] = torch.tensor(p)
        mask[r, :len(p)] = 1
    rows = RowAdapters.from_pairs([pairs[c["adapter"]] if c["adapter"] else None for c in cases])
    parts = T5Parts.of(model)
    steps = max(c["steps"] for c in cases)
    cache = KVCache(parts, max_rows=n, max_target=steps + 1, max_source=width, max_prefix=8, adapterhub=True)
    embeds, mask2 = slots.encoder_inputs(ids, mask, rows)
    slots.set_rows(rows, token_mask=mask2)
    hidden = encode(parts, embeds, mask2, slots.encoder_prefix(rows))
    prefill_cross(parts, cache, list(range(n)), hidden, mask2)
    cache.set_prefixes(0, n, slots.decoder_prefixes(rows))
    slots.set_rows(rows)
    start = [0 if r % 2 == 0 else LATE for r in range(n)]
    compared, worst = 0, 0.0
    for step in range(steps + LATE):
        positions = torch.tensor([min(max(step - s, 0), steps - 1) for s in start])
        tokens = torch.tensor([([0] + c["tokens"])[min(int(positions[r]), c["steps"] - 1)] for r, c in enumerate(cases)])
        logits = decode_step(parts, cache, tokens, positions)
        for r, c in enumerate(cases):
            t = step - start[r]
            if not 0 <= t < c["steps"]:
                continue
            assert int(logits[r].argmax()) == c["tokens"][t], f"{c['case']} step {t}: not AdapterHub's token"
            if c["logits"]:
                diff = (logits[r] - logits_ref[c["case"]][t]).abs().max().item()
                assert diff <= TOL, f"{c['case']} step {t}: logits differ by {diff}"
                compared, worst = compared + 1, max(worst, diff)
    print(f"{base_name}: {compared} logit vectors compared, max |diff| {worst:.2e}")
    assert compared >= len([c for c in cases if c["logits"]])


@pytest.mark.parametrize("base_name", ["base_gated", "base_relu"])
def test_engine_continuous_batch_gives_adapterhub_tokens(expected, base_name):
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    if base_name not in expected["bases"]:
        pytest.skip(f"no {base_name} in the fixtures")
    engine = Engine.from_config(EngineConfig(base=str(FIXTURES / expected["bases"][base_name]["dir"]),
                                             max_bottleneck=64, max_prefix_tokens=8, max_batch_rows=64))
    try:
        names = [n for n, a in expected["adapters"].items() if a["base"] == base_name]
        for n in names:
            spec = engine.register_adapter(n, FIXTURES / expected["adapters"][n]["dir"])
            assert spec.kind in (AdapterKind.ADAPTERHUB, AdapterKind.LORA, AdapterKind.IA3)
        cases = [c for c in expected["cases"] if c["base"] == base_name]
        if base_name == "base_gated":
            assert POOL_FORMS <= {c["adapter"] for c in cases}
        reqs = [GenerationRequest(inputs=expected["prompts"][c["prompt"]]["text"], adapter=c["adapter"],
                                  params=GenerationParams(max_new_tokens=c["steps"])) for c in cases]
        results = asyncio.run(staggered(engine, reqs))
        for c, res in zip(cases, results, strict=True):
            assert list(res.token_ids) == c["tokens"], c["case"]
    finally:
        engine.close()
