"""Structured output per row: JSON schemas, any JSON object and regexes, on ByT5 (the embedded base) and on a
T5 SentencePiece tokenizer (the same weights with tests/sentencepiece_tokenizer.py's tokenizer, whose
vocabulary is smaller than the LM head: the padding ids must never be allowed). Constrained rows share the
batch with free rows and with each other; every constrained output parses and fits its schema, and ends
(EOS) within max_new_tokens because no free whitespace is allowed."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import pytest

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest, RequestValidationError
from tests.sentencepiece_tokenizer import build_t5_sentencepiece_tokenizer
from tests.serve.engine_helpers import staggered

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                    "maxItems": 2}},
          "required": ["color", "n", "ok", "tags"], "additionalProperties": False}
REGEX = r"(yes|no), [0-9]{2}"


def _check(schema_out: str) -> None:
    doc = json.loads(schema_out)
    assert set(doc) == {"color", "n", "ok", "tags"}
    assert doc["color"] in ("red", "green", "blue") and 0 <= doc["n"] <= 99 and isinstance(doc["ok"], bool)
    assert len(doc["tags"]) <= 2 and set(doc["tags"]) <= {"a", "b"}
    assert " " not in schema_out and "\n" not in schema_out  # compact: no free whitespace


@pytest.fixture(scope="module", params=["byt5", "sentencepiece"])
def engine(request, tiny_base_dir, tmp_path_factory):
    base = tiny_base_dir
    if request.param == "sentencepiece":
        base = tmp_path_factory.mktemp("sp-base") / "t5"
        shutil.copytree(tiny_base_dir, base)
        for f in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            (base / f).unlink(missing_ok=True)
        tok = build_t5_sentencepiece_tokenizer(base, vocab_size=300)
        assert len(tok) < 384  # the head is wider than the vocabulary
    cfg = EngineConfig(base=str(base), max_batch_rows=16, max_new_tokens_cap=64, max_input_tokens=64,
                       request_timeout_s=300)
    with Engine.from_config(cfg) as e:
        yield e


def test_constrained_rows_parse_and_end_beside_free_rows(engine):
    def req(grammar, text="answer:", **kw):
        return GenerationRequest(text, params=GenerationParams(max_new_tokens=64, grammar=grammar, **kw))

    reqs = [req({"type": "json", "value": SCHEMA}), req(None), req({"type": "regex", "value": REGEX}),
            req({"type": "json", "value": json.dumps(SCHEMA)}, text="another prompt", do_sample=True, seed=3),
            req({"type": "json_object"}, text="obj", repetition_penalty=1.3), req(None, text="free"),
            req({"type": "regex", "value": REGEX}, text="x", do_sample=True, seed=9, n=2)]
    results = asyncio.run(staggered(engine, reqs))
    for r in (results[0], results[3]):
        assert r.finish_reason == "eos", r.text
        _check(r.text)
    for out in [results[2].text] + [s.text for s in results[6].sequences]:
        assert re.fullmatch(REGEX, out), out
    assert results[2].finish_reason == "eos"
    # any JSON object: unbounded, so it may run to max_new_tokens; when it ends, it parses
    assert results[4].text.startswith("{")
    if results[4].finish_reason == "eos":
        assert isinstance(json.loads(results[4].text), dict)
    assert not re.fullmatch(REGEX, results[1].text)


def test_constrained_beams_parse(engine):
    res = engine.generate(GenerationRequest("beam", params=GenerationParams(
        max_new_tokens=64, num_beams=3, num_return_sequences=2, grammar={"type": "json", "value": SCHEMA})))
    for s in res.sequences:
        assert s.finish_reason == "eos"
        _check(s.text)


def test_a_finished_grammar_ends_the_row_even_under_min_new_tokens(engine):
    res = engine.generate(GenerationRequest("x", params=GenerationParams(
        max_new_tokens=16, min_new_tokens=10, grammar={"type": "regex", "value": "ok"})))
    assert res.text == "ok" and res.finish_reason == "eos"


def test_a_grammar_the_tokenizer_cannot_spell_is_refused(engine):
    """The SentencePiece test vocabulary has no token for "€" (no byte fallback), as T5's has none for "{":
    refused up front with a 422, rather than an empty answer. ByT5 spells every byte."""
    req = GenerationRequest("x", params=GenerationParams(max_new_tokens=8, grammar={"type": "regex", "value": "€+"}))
    if type(engine.tokenizer).__name__.startswith("ByT5"):
        assert engine.generate(req).text.startswith("€")
        return
    with pytest.raises(RequestValidationError) as e:
        engine.prepare(req)
    assert "cannot spell" in str(e.value)


def test_whitespace_can_be_allowed(engine):
    g = {"type": "regex", "value": r"a b"}
    res = engine.generate(GenerationRequest("w", params=GenerationParams(max_new_tokens=16, grammar=g)))
    assert res.text == "a b"


@pytest.mark.parametrize("grammar, says", [
    ({"type": "regex", "value": "(unclosed"}, "invalid regex"),
    ({"type": "json", "value": "{not json"}, "not valid JSON"),
    ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}, "frobnicate"),
    ({"type": "json", "value": 5}, "must be an object"),
    ({"type": "regex"}, "non-empty string"),
])
def test_invalid_grammar_is_a_validation_error_naming_the_problem(engine, grammar, says):
    with pytest.raises(RequestValidationError) as e:
        engine.prepare(GenerationRequest("x", params=GenerationParams(grammar=grammar)))
    assert says in str(e.value) and e.value.field.startswith("params.grammar")
