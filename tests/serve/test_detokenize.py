"""Incremental detokenization: the pieces concatenate to the full decode, for ByT5 (bytes, multi-byte UTF-8
characters split over tokens) and for a T5 SentencePiece tokenizer (leading spaces, punctuation)."""

from __future__ import annotations

import random

import pytest

from serve.engine.detokenize import Detokenizer, IncrementalText
from tests.sentencepiece_tokenizer import build_t5_sentencepiece_tokenizer

TEXTS = ["plain ascii text", "café — naïve résumé, 日本語 and emoji 🦉!", 'JSON: {"a": [1, 2]}', "Hello, world! (ok)"]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return build_t5_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


def _pieces(detok: Detokenizer, ids: list[int]) -> list[str]:
    text = IncrementalText()
    pieces = [text.push(detok, i) for i in ids]
    return pieces + [text.flush(detok)]


@pytest.mark.parametrize("which", ["byt5", "sentencepiece"])
def test_pieces_concatenate_to_the_full_decode(which, tiny_base, sp_tokenizer):
    tok = tiny_base.tokenizer if which == "byt5" else sp_tokenizer
    detok = Detokenizer(tok)
    for text in TEXTS:
        ids = tok(text).input_ids  # ends with </s>: a special id, dropped
        pieces = _pieces(detok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_a_character_split_over_byte_tokens_waits_for_its_last_byte(tiny_base):
    detok = Detokenizer(tiny_base.tokenizer)
    ids = tiny_base.tokenizer("é!").input_ids[:-1]  # two bytes of é, then '!'
    assert len(ids) == 3
    assert _pieces(detok, ids) == ["", "é", "!", ""]


def test_an_unfinished_character_comes_out_at_flush_as_the_full_decode_has_it(tiny_base):
    tok = tiny_base.tokenizer
    ids = tok("é").input_ids[:1]  # the first byte only
    assert "".join(_pieces(Detokenizer(tok), ids)) == tok.decode(ids, skip_special_tokens=True)


def test_random_ids_with_special_and_out_of_vocabulary_ids(tiny_base, sp_tokenizer):
    rng = random.Random(0)
    for tok in (tiny_base.tokenizer, sp_tokenizer):
        detok = Detokenizer(tok)
        for _ in range(20):
            ids = [rng.randrange(len(tok) + 40) for _ in range(rng.randrange(1, 30))]
            assert "".join(_pieces(detok, ids)) == tok.decode([i for i in ids if i < len(tok)],
                                                              skip_special_tokens=True)


def test_token_text_is_the_tokens_own_decode_read_once(tiny_base, sp_tokenizer):
    for tok in (tiny_base.tokenizer, sp_tokenizer):
        detok = Detokenizer(tok)
        ids = [*tok("café, JSON!").input_ids, len(tok) + 3]
        assert [detok.token_text(i) for i in ids] == [tok.decode([i]) for i in ids[:-1]] + [""]
        assert detok.token_text(ids[0]) is detok.token_text(ids[0])  # memoized
