"""Several adapters on one row through the engine: ONE continuous batch (rows join and leave between steps)
mixing combinations, single adapters and base rows. Each row's greedy tokens equal PEFT's computation of its
combination (tests/combination_oracle.py), its log-probabilities within 1e-4; ties is built once, on first use;
every combination the engine cannot serve is refused with a message naming the problem."""

from __future__ import annotations

import asyncio

import pytest

from serve.engine import (
    Engine,
    EngineConfig,
    GenerationParams,
    GenerationRequest,
    MergedAdapters,
    RequestValidationError,
    UnknownAdapterError,
)
from tests.combination_oracle import greedy, model_for
from tests.peft_zoo import dora, ia3, lora, prefix, prompt
from tests.serve.engine_helpers import staggered

NEW_TOKENS = 6
INPUTS = ["the quick brown fox", "summarize: engines batch rows", "hello there", "x y z"]


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    root, m = tmp_path_factory.mktemp("combos"), tiny_base.model
    return {"l1": lora(m, root / "l1", 61, r=4, target_modules=["q", "v", "wo"]),
            "l2": lora(m, root / "l2", 62, r=8, target_modules=["q", "k", "v", "o", "wi_0", "wo"]),
            "l3": lora(m, root / "l3", 63, r=4, target_modules=["q", "k", "v"]),
            "ia3": ia3(m, root / "ia3", 64),
            "prompt": prompt(m, root / "prompt", 65, 4),
            "prompt6": prompt(m, root / "prompt6", 66, 6),
            "prefix": prefix(m, root / "prefix", 67, 4),
            "dora": dora(m, root / "dora", 68, r=4, target_modules=["q", "v"])}


@pytest.fixture(scope="module")
def engine(tiny_base_dir, zoo):
    cfg = EngineConfig(base=str(tiny_base_dir), max_batch_rows=16, max_new_tokens_cap=16, max_input_tokens=64,
                       max_prefix_tokens=8, request_timeout_s=120, ia3_merge="never", max_combined_adapters=3,
                       device_slots={"lora": 6, "ia3": 1, "bitfit": 1, "prompt": 2, "prefix": 1})
    with Engine.from_config(cfg) as e:
        for name, path in zoo.items():
            e.register_adapter(name, path)
        yield e


def _req(text, adapter=None, merged=None):
    return GenerationRequest(text, adapter=adapter, merged_adapters=merged,
                             params=GenerationParams(max_new_tokens=NEW_TOKENS, logprobs=True))


def _reference(step, tok, text, eos):
    ids = tok([text], return_tensors="pt").input_ids
    return greedy(lambda dec: step(ids, dec), NEW_TOKENS, eos)


COMBOS = {  # name -> (merged_adapters, oracle parts [(adapter, weight)], oracle strategy)
    "lora+lora": (MergedAdapters(["l1", "l2"], [0.6, -0.5]), [("l1", 0.6), ("l2", -0.5)], "cat"),
    "lora+ia3": (MergedAdapters(["l2", "ia3"]), [("l2", 1.0), ("ia3", 1.0)], "cat"),
    "lora+prompt": (MergedAdapters(["l1", "prompt"]), [("l1", 1.0), ("prompt", 1.0)], "cat"),
    "lora+ia3+prefix": (MergedAdapters(["l2", "ia3", "prefix"], [0.5, 1.0, 1.0]),
                        [("l2", 0.5), ("ia3", 1.0), ("prefix", 1.0)], "cat"),
    "3 terms": (MergedAdapters(["l1", "l3", "ia3"], [1.5, 0.5, 1.0]), [("l1", 1.5), ("l3", 0.5), ("ia3", 1.0)], "cat"),
    "ties": (MergedAdapters(["l1", "l3"], [0.8, 0.6], merge_strategy="ties", density=0.5),
             [("l1", 0.8), ("l3", 0.6)], "ties"),
}


def test_combinations_in_one_continuous_batch_match_peft(engine, tiny_base, zoo):
    reqs, expect = [], []
    for i in range(2):
        for name, (merged, _, _) in COMBOS.items():
            reqs.append(_req(INPUTS[i % 4], merged=merged))
            expect.append(name)
        for single in (None, "l1", "ia3"):
            reqs.append(_req(INPUTS[(i + 1) % 4], adapter=single))
            expect.append(single)
    results = asyncio.run(staggered(engine, reqs))
    refs, base_tokens = {}, {}
    for req, res, name in zip(reqs, results, expect, strict=True):
        key = (name, req.inputs)
        if key not in refs:
            if name in COMBOS:
                _, parts, strategy = COMBOS[name]
                extra = {"density": 0.5, "majority_sign_method": "total"} if strategy == "ties" else {}
                step = model_for(tiny_base.model, [(zoo[a], w) for a, w in parts], strategy=strategy, **extra)
            else:
                step = model_for(tiny_base.model, [] if name is None else [(zoo[name], 1.0)])
            refs[key] = _reference(step, tiny_base.tokenizer, req.inputs, tiny_base.model.config.eos_token_id)
        tokens, logprobs = refs[key]
        assert res.token_ids == tokens, f"{name} on {req.inputs!r}"
        assert res.logprobs == pytest.approx(logprobs, abs=1e-4), name
        if name is None:
            base_tokens[req.inputs] = tokens
        if name in COMBOS:
            merged = COMBOS[name][0]
            assert res.merge_strategy == merged.merge_strategy
            assert [a["id"] for a in res.adapters] == merged.ids
            assert all(a["version"] >= 1 for a in res.adapters)
    differs = {n for (n, text), (tok, _) in refs.items() if n in COMBOS and text in base_tokens
               and tok != base_tokens[text]}
    assert len(differs) >= 3, f"combinations should change greedy outputs; only {sorted(differs)} did"
    assert len(engine.derived) == 1  # both ties rows ran on one derived adapter


def test_ties_is_built_once_and_cached(engine):
    merged = MergedAdapters(["l1", "l3"], [0.3, 0.9], merge_strategy="ties", density=0.7)
    loads = engine.cache.stats().loads
    first = engine.generate(_req("hello there", merged=merged))
    built = engine.cache.stats().loads
    second = engine.generate(_req("hello there", merged=merged))
    assert built == loads + 1 and engine.cache.stats().loads == built  # the warm request builds nothing
    assert first.token_ids == second.token_ids


def test_replacing_a_source_drops_its_derived_adapters(engine, zoo):
    merged = MergedAdapters(["l1", "l3"], merge_strategy="dare_linear", density=0.9)
    engine.generate(_req("x y z", merged=merged))
    before = len(engine.derived)
    engine.register_adapter("l3", zoo["l3"], replace=True)
    assert len(engine.derived) < before
    res = engine.generate(_req("x y z", merged=merged))
    version = next(a["version"] for a in engine.adapters() if a["name"] == "l3")
    assert {a["id"]: a["version"] for a in res.adapters}["l3"] == version


@pytest.mark.parametrize("merged, match", [
    (MergedAdapters(["prompt", "prompt6"]), "at most one soft prompt or prefix.*lengths differ"),
    (MergedAdapters(["prompt", "prefix"]), "at most one soft prompt or prefix"),
    (MergedAdapters(["l1", "ia3"], [1.0, 0.5]), "only LoRA deltas can be weighted"),
    (MergedAdapters(["l1", "l2"], merge_strategy="average"), "unknown merge_strategy 'average'"),
    (MergedAdapters(["l1", "l2", "l3", "ia3"]), "1 to 3 adapters"),
    (MergedAdapters(["l1", "l2"], [1.0]), "2 adapters but 1 weights"),
    (MergedAdapters(["l1", "l1"]), "appears more than once"),
    (MergedAdapters(["l1", "l2"], merge_strategy="ties"), "one rank"),
    (MergedAdapters(["l1", "ia3"], merge_strategy="ties"), "plain LoRA adapters only"),
    (MergedAdapters(["l1", "l3"], merge_strategy="ties", density=0.0), "density must be in"),
    (MergedAdapters(["l1", "l3"], merge_strategy="dare_ties", majority_sign_method="max"), "majority_sign_method"),
    (MergedAdapters(["dora", "l1"]), "DoRA"),
    (MergedAdapters(["l1", "l2"], [1.0, float("nan")]), "finite number"),
    (MergedAdapters(["l1", "l2"], [1.0, 1e30]), r"weights lie in \[-100, 100\]"),
])
def test_combinations_that_cannot_be_served_are_refused_with_the_reason(engine, merged, match):
    with pytest.raises(RequestValidationError, match=match) as info:
        engine.generate(_req("hello", merged=merged))
    assert info.value.field == "merged_adapters"


def test_unknown_ids_and_both_fields_are_refused(engine):
    with pytest.raises(UnknownAdapterError):
        engine.generate(_req("hello", merged=MergedAdapters(["l1", "nope"])))
    with pytest.raises(RequestValidationError, match="not both"):
        engine.generate(_req("hello", adapter="l1", merged=MergedAdapters(["l2"])))
    with pytest.raises(RequestValidationError, match="non-empty list"):
        engine.generate(_req("hello", merged=MergedAdapters([])))
    # the engine keeps serving
    assert engine.generate(_req("hello", adapter="l1")).generated_tokens >= 1


def test_a_combination_pins_every_part_while_it_runs(engine):
    merged = MergedAdapters(["l1", "l2"], [0.5, 0.5])

    async def run():
        task = asyncio.ensure_future(engine.submit(_req("the quick brown fox", merged=merged)))
        for _ in range(500):
            await asyncio.sleep(0.002)
            if engine.loop.running:
                break
        pinned = engine.cache.stats().pinned
        await task
        return pinned

    assert asyncio.run(run()) == 2
    assert engine.cache.stats().pinned == 0


def test_a_merged_ia3_is_unmerged_when_a_combination_with_it_joins(tiny_base_dir, tiny_base, zoo):
    """(IA)3 merges into the weights while every row is that adapter alone; a combination row holding it must
    not see it twice (merged and per row): the engine unmerges first, and the rows match the oracle."""
    cfg = EngineConfig(base=str(tiny_base_dir), max_batch_rows=8, max_new_tokens_cap=16, max_input_tokens=64,
                       request_timeout_s=120, ia3_merge="auto", ia3_merge_after_steps=0,
                       device_slots={"lora": 2, "ia3": 1, "bitfit": 1, "prompt": 1})
    merged = MergedAdapters(["l1", "ia3"])
    with Engine.from_config(cfg) as engine:
        for name in ("l1", "ia3"):
            engine.register_adapter(name, zoo[name])
        engine.generate([_req(INPUTS[0], adapter="ia3")] * 2)
        assert engine.counters["merges"] == 1
        reqs = [_req(INPUTS[1], adapter="ia3"), _req(INPUTS[2], merged=merged), _req(INPUTS[3], adapter="ia3")]
        results = asyncio.run(staggered(engine, reqs))
        assert engine.counters["unmerges"] >= 1
    eos = tiny_base.model.config.eos_token_id
    pair = model_for(tiny_base.model, [(zoo["l1"], 1.0), (zoo["ia3"], 1.0)])
    alone = model_for(tiny_base.model, [(zoo["ia3"], 1.0)])
    for req, res in zip(reqs, results, strict=True):
        tokens, logprobs = _reference(pair if req.merged_adapters else alone, tiny_base.tokenizer, req.inputs, eos)
        assert res.token_ids == tokens and res.logprobs == pytest.approx(logprobs, abs=1e-4)
