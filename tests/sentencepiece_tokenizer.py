"""A small T5-style SentencePiece tokenizer (Unigram + Metaspace, `</s>` appended, extra ids) built offline with
the `tokenizers` library, for tests that must hold for T5's real tokenizer family as well as for ByT5."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! Naïve café — résumé, déjà vu.",
    'JSON: {"name": "owl", "count": [1, 2, 3], "ok": true, "none": null}', "summarize: the meeting was long",
    "translate English to German: How old are you?", "Numbers 0123456789 and symbols #$%&*+-/<=>@[]^_`|~",
    "Questions? Answers. Semicolons; colons: quotes 'single' \"double\" (parens) {braces}",
]


def build_t5_sentencepiece_tokenizer(out: Path, vocab_size: int = 400):
    """Train it, save it under `out` (transformers' T5 tokenizer files) and return the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    chars = sorted({c for line in CORPUS for c in line})
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", initial_alphabet=chars)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=8)
    t5.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)
