"""Per-row logits processors, several outputs and alternatives, in one continuous batch.

Oracles: HF `generate` with the same processor (repetition_penalty, no_repeat_ngram_size, min_new_tokens,
sequence_bias for logit_bias; the typical-p warper), OpenAI's published formula for frequency/presence
penalties (a greedy loop over full forwards), the engine's own single-row output for n / best_of (each
candidate is the row its derived seed samples alone), and log_softmax of the reference logits for top-n.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest, RequestValidationError
from tests.beam_oracle import alone, hf_generate
from tests.serve.engine_helpers import staggered

NEW = 10
TEXTS = ["the quick brown fox", "summarize: engines batch rows", "hello there", "x y z"]
CASES = [  # (our params, HF generate kwargs)
    ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    ({"repetition_penalty": 0.6}, {"repetition_penalty": 0.6}),
    ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 2}),
    ({"no_repeat_ngram_size": 1}, {"no_repeat_ngram_size": 1}),
    ({"min_new_tokens": 8, "logit_bias": {1: 6.0}}, {"min_new_tokens": 8, "sequence_bias": {(1,): 6.0}}),
    ({"logit_bias": {170: -100.0, 377: 5.0}}, {"sequence_bias": {(170,): -100.0, (377,): 5.0}}),
    ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 4, "logit_bias": {219: 2.5}},
     {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 4, "sequence_bias": {(219,): 2.5}}),
]


@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    cfg = EngineConfig(base=str(tiny_base_dir), max_batch_rows=48, max_new_tokens_cap=32, max_input_tokens=64,
                       request_timeout_s=300, max_beams=4, max_n=6)
    with Engine.from_config(cfg) as e:
        yield e


def test_processors_equal_hf_generate_per_row_in_one_batch(engine, tiny_base):
    reqs, expect = [], []
    for i, (ours, hf) in enumerate(CASES):
        text = TEXTS[i % len(TEXTS)]
        reqs.append(GenerationRequest(text, params=GenerationParams(max_new_tokens=NEW, **ours)))
        expect.append(hf_generate(tiny_base.model, tiny_base.tokenizer, text, max_new_tokens=NEW, **hf)[0])
        reqs.append(GenerationRequest(text, params=GenerationParams(max_new_tokens=NEW)))  # plain neighbour
        expect.append(hf_generate(tiny_base.model, tiny_base.tokenizer, text, max_new_tokens=NEW)[0])
    # a beam search with a repetition penalty beside them: HF applies processors to its log-probabilities
    reqs.append(GenerationRequest(TEXTS[0], params=GenerationParams(max_new_tokens=NEW, num_beams=3,
                                                                    repetition_penalty=1.5)))
    expect.append(hf_generate(tiny_base.model, tiny_base.tokenizer, TEXTS[0], max_new_tokens=NEW, num_beams=3,
                              repetition_penalty=1.5)[0])
    results = asyncio.run(staggered(engine, reqs))
    for req, res, want in zip(reqs, results, expect, strict=True):
        assert res.token_ids == want, req.params
    plain = {r.inputs: res.token_ids for r, res in zip(reqs, results, strict=True) if r.params.min_new_tokens == 0
             and r.params.repetition_penalty == 1.0 and not r.params.no_repeat_ngram_size and not r.params.logit_bias}
    changed = sum(res.token_ids != plain[r.inputs] for r, res in zip(reqs[:-1:2], results[:-1:2], strict=True))
    assert changed >= 5, "the processors should change most outputs of this model"


def _openai_reference(model, tok, text: str, freq: float, pres: float) -> list[int]:
    ids = tok([text], return_tensors="pt").input_ids
    dec, counts = torch.zeros(1, 1, dtype=torch.long), torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=ids, decoder_input_ids=dec).logits[0, -1]
            logits = logits - freq * counts - pres * (counts > 0).float()
            nxt = int(logits.argmax())
            counts[nxt] += 1
            dec = torch.cat((dec, torch.tensor([[nxt]])), 1)
            if nxt == model.config.eos_token_id:
                break
    return dec[0, 1:].tolist()


def test_frequency_and_presence_penalties_follow_openai(engine, tiny_base):
    cases = [(0.8, 0.0), (0.0, 1.5), (1.2, 0.7), (-0.5, 0.0)]
    reqs = [GenerationRequest(TEXTS[i], params=GenerationParams(max_new_tokens=NEW, frequency_penalty=f,
                                                                presence_penalty=p)) for i, (f, p) in enumerate(cases)]
    results = engine.generate(reqs)
    for (f, p), req, res in zip(cases, reqs, results, strict=True):
        want = alone(lambda r=req, f=f, p=p: _openai_reference(tiny_base.model, tiny_base.tokenizer, r.inputs, f, p))
        assert res.token_ids == want, (f, p)


def test_typical_filter_equals_hf_warper():
    from transformers.generation.logits_process import TypicalLogitsWarper

    from serve.engine.sampling import filter_logits

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    for mass in (0.2, 0.5, 0.9):
        want = TypicalLogitsWarper(mass=mass)(None, logits.clone())
        got = torch.stack([filter_logits(row, 1.0, 0, 1.0, mass) for row in logits])
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), mass


def test_typical_sampling_is_seeded_per_row(engine):
    p = GenerationParams(max_new_tokens=6, do_sample=True, typical_p=0.5, seed=5)
    a = engine.generate(GenerationRequest(TEXTS[0], params=p))
    b, _ = engine.generate([GenerationRequest(TEXTS[0], params=p), GenerationRequest(TEXTS[1], params=p)])
    assert a.token_ids == b.token_ids


def test_n_and_best_of_are_seeded_candidates_ranked_by_logprob(engine):
    from serve.engine.sequence import SEED_STRIDE

    params = GenerationParams(max_new_tokens=6, do_sample=True, temperature=1.0, seed=11, n=3)
    res = engine.generate(GenerationRequest(TEXTS[1], params=params))
    assert len(res.sequences) == 3 and res.token_ids == res.sequences[0].token_ids
    for j, out in enumerate(res.sequences):  # candidate j samples as a lone request with seed + j * stride
        alone = engine.generate(GenerationRequest(TEXTS[1], params=GenerationParams(
            max_new_tokens=6, do_sample=True, temperature=1.0, seed=(11 + j * SEED_STRIDE) % 2**63)))
        assert out.token_ids == alone.token_ids
    assert len({tuple(s.token_ids) for s in res.sequences}) > 1
    best = engine.generate(GenerationRequest(TEXTS[1], params=GenerationParams(
        max_new_tokens=6, do_sample=True, seed=11, n=2, best_of=5)))
    pool = engine.generate(GenerationRequest(TEXTS[1], params=GenerationParams(
        max_new_tokens=6, do_sample=True, seed=11, n=5, logprobs=True)))
    ranked = sorted(pool.sequences, key=lambda s: -sum(s.logprobs))
    assert [s.token_ids for s in best.sequences] == [s.token_ids for s in ranked[:2]]
    assert best.sequences[0].score == pytest.approx(sum(ranked[0].logprobs), abs=1e-5)


def test_top_n_tokens_are_the_models_alternatives(engine, tiny_base):
    res = engine.generate(GenerationRequest(TEXTS[0], params=GenerationParams(max_new_tokens=4, top_n_tokens=3,
                                                                              logprobs=True)))
    ids = tiny_base.tokenizer([TEXTS[0]], return_tensors="pt").input_ids
    dec = torch.tensor([[0] + res.token_ids[:-1]])
    with torch.no_grad():
        lp = alone(lambda: torch.log_softmax(tiny_base.model(input_ids=ids, decoder_input_ids=dec).logits[0], -1))
    assert len(res.top_tokens) == len(res.token_ids)
    for t, alts in enumerate(res.top_tokens):
        want = torch.topk(lp[t], 3)
        assert [a for a, _ in alts] == want.indices.tolist()
        assert [v for _, v in alts] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert alts[0][0] == res.token_ids[t]


@pytest.mark.parametrize("params, field, says", [
    ({"num_beams": 5}, "params.num_beams", "max_beams"),
    ({"repetition_penalty": -1.0}, "params.repetition_penalty", "> 0"),
    ({"frequency_penalty": 3.0}, "params.frequency_penalty", "-2.0 and 2.0"),
    ({"n": 7}, "params.n", "max_n"),
    ({"n": 2, "best_of": 1}, "params.best_of", "between n"),
    ({"num_beams": 4, "n": 4}, "params.num_beams", "row budget"),
    ({"num_beams": 2, "num_return_sequences": 3}, "params.num_return_sequences", "num_beams"),
    ({"top_n_tokens": 11}, "params.top_n_tokens", "max_top_n_tokens"),
    ({"top_n_tokens": 2, "num_beams": 2}, "params.top_n_tokens", "beam search"),
    ({"min_new_tokens": 40}, "params.min_new_tokens", "max_new_tokens"),
    ({"logit_bias": {999: 1.0}}, "params.logit_bias", "vocabulary"),
    ({"logit_bias": {5: 500}}, "params.logit_bias", "-100 and 100"),
    ({"typical_p": 0.0}, "params.typical_p", "(0, 1]"),
    ({"early_stopping": "sometimes"}, "params.early_stopping", "never"),
    ({"grammar": {"type": "regex", "value": "a(b"}}, "params.grammar.value", "regex"),
    ({"grammar": {"type": "json", "value": {"type": "nonsense"}}}, "params.grammar.value", "nonsense"),
    ({"grammar": {"type": "xml", "value": "x"}}, "params.grammar.type", "json"),
])
def test_out_of_range_values_say_the_limit(engine, params, field, says):
    p = GenerationParams(max_new_tokens=8, **params)
    if p.n * max(p.num_beams, 1) > 1 and field == "params.num_beams" and "row budget" in says:
        engine.config.max_batch_rows, saved = 12, engine.config.max_batch_rows
    else:
        saved = None
    try:
        with pytest.raises(RequestValidationError) as e:
            engine.generate(GenerationRequest("x", params=p))
    finally:
        if saved is not None:
            engine.config.max_batch_rows = saved
    assert e.value.field == field and says in str(e.value), str(e.value)
