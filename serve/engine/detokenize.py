"""Token ids -> text, incrementally: each new token costs a decode of a few tokens, not of the whole output.

`Detokenizer` reads a tokenizer's facts once (vocabulary size, special ids): transformers recomputes
`all_special_ids` on every `decode(..., skip_special_tokens=True)` call, which cost 0.11 ms per token on
the development machine, more than the rest of a token's host-side work together.

`IncrementalText` is the windowed decode TGI and vLLM use: decode the last few tokens with and without the
new one and emit the difference. The window starts one token before the unread ones, so tokenizers that
drop a word's leading space at the start of a decode (SentencePiece) or clean up spaces around punctuation
see the same neighbour as in a full decode. While the newest tokens end inside a character (a byte-level
tokenizer between the bytes of one UTF-8 character), nothing is emitted; `flush` emits what is left when the
sequence ends. The concatenated pieces are the sequence's text.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to (byte-level tokenizers)


class Detokenizer:
    """One per tokenizer: decodes ids, dropping special ids and ids past the tokenizer's vocabulary (T5 heads
    are padded past it: FLAN-T5 has 32,128 logits for 32,100 tokens, and a sampled padding id must not fail
    the batch)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self.special = frozenset(tokenizer.all_special_ids)
        self._texts: dict[int, str] = {}

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens included (what TGI's `details.tokens` show), read once per id:
        a response's details would otherwise cost a tokenizer call per generated token."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token]) if 0 <= token < self.size else ""
        return text

    def keeps(self, token: int) -> bool:
        return 0 <= token < self.size and token not in self.special

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if self.keeps(t)], skip_special_tokens=False)


class IncrementalText:
    """One sequence's decoding state: the kept ids, and the window [prefix, read) already turned into text."""

    __slots__ = ("ids", "prefix", "read")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prefix = 0  # first id of the decode window (one before the unread ids)
        self.read = 0  # ids before this one are in the emitted text

    def push(self, detok: Detokenizer, token: int) -> str:
        """Text the new token adds ("" while it ends inside a character, or for a special token)."""
        if not detok.keeps(token):
            return ""
        self.ids.append(token)
        return self._advance(detok, final=False)

    def flush(self, detok: Detokenizer) -> str:
        """At the end: whatever the unread ids decode to, partial characters included."""
        return self._advance(detok, final=True) if self.read < len(self.ids) else ""

    def _advance(self, detok: Detokenizer, final: bool) -> str:
        tok = detok.tokenizer
        before = tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        after = tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR)):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
