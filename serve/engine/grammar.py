"""Structured output: a row's grammar (JSON schema, any JSON object, or a regex) as a token mask per step,
computed by llguidance (the Rust parser behind Guidance; no torch dependency, masks in microseconds).

- `check_grammar_shape`: the request's grammar object, normalized (caller's thread, no tokenizer needed).
- `GrammarCompiler`: one per engine. Builds llguidance's tokenizer once from the engine's tokenizer's token
  bytes (ByT5: ids 3..258 are the bytes 0..255; T5's SentencePiece: each piece with U+2581 as a space,
  byte-fallback pieces as bytes; other fast tokenizers through their tokenizer.json), compiles a request's grammar and refuses an invalid one naming the problem (422).
- `GrammarRow`: one row's matcher and its next-token bitmask. The batch loop consumes each sampled token and
  computes the next mask on a worker thread while the model step runs (llguidance releases the GIL).

JSON is compact by default (`whitespace: false`): no free whitespace between tokens, so a model cannot spin
in whitespace and every constrained output ends within the schema's bounds; `"whitespace": true` allows it.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

from serve.engine.errors import RequestValidationError

TYPES = ("json", "regex", "json_object")
FIELD = "params.grammar"


def check_grammar_shape(grammar, max_bytes: int) -> dict:
    """{"type": "json", "value": <schema or its JSON text>} | {"type": "regex", "value": "..."} |
    {"type": "json_object"} -> the same with the schema parsed; RequestValidationError otherwise."""
    if not isinstance(grammar, dict):
        raise RequestValidationError(FIELD, f"must be an object {{\"type\", \"value\"}}, got {type(grammar).__name__}")
    kind = grammar.get("type")
    if kind not in TYPES:
        raise RequestValidationError(f"{FIELD}.type", f"must be one of {', '.join(TYPES)}, got {kind!r}")
    unknown = set(grammar) - {"type", "value", "whitespace"}
    if unknown:
        raise RequestValidationError(FIELD, f"unknown keys {sorted(unknown)}; a grammar has type, value, whitespace")
    whitespace = grammar.get("whitespace", False)
    if not isinstance(whitespace, bool):
        raise RequestValidationError(f"{FIELD}.whitespace", "must be true or false")
    value = grammar.get("value")
    if kind == "json_object":
        value = {"type": "object"}
    elif kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RequestValidationError(f"{FIELD}.value", f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise RequestValidationError(f"{FIELD}.value", "a JSON schema must be an object (or true)")
    elif not isinstance(value, str) or not value:
        raise RequestValidationError(f"{FIELD}.value", "a regex grammar's value must be a non-empty string")
    size = len(value if isinstance(value, str) else json.dumps(value))
    if size > max_bytes:
        raise RequestValidationError(f"{FIELD}.value", f"{size} characters; this server accepts grammars of at "
                                                       f"most {max_bytes} (max_grammar_bytes)")
    return {"type": kind, "value": value, "whitespace": whitespace}


def _special(name) -> bytes:
    """How llguidance marks a special token: a 0xFF byte, then its name (never part of any text)."""
    return b"\xff" + str(name).encode()


def _byt5_tokens(tokenizer, vocab: int) -> list[bytes]:
    """ByT5: ids 3..258 are the bytes 0..255; the rest (pad, eos, unk, extra ids, head padding) are special."""
    out = []
    for i in range(vocab):
        if 3 <= i < 259:
            out.append(bytes([i - 3]))
        else:
            out.append(_special(tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else f"<unused_{i}>"))
    return out


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_tokens(tokenizer, vocab: int) -> list[bytes]:
    """SentencePiece (T5): a piece's text with its word marker U+2581 as the space it decodes to, byte-fallback
    pieces (<0x0A>) as their byte; special ids, and the LM head's ids past the tokenizer, special."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(vocab):
        if i >= len(tokenizer) or i in special:
            out.append(_special(tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else f"<unused_{i}>"))
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        m = _BYTE_PIECE.fullmatch(piece)
        out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode())
    return out


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, EOS, and an encoder bytes -> ids
    (greedy longest match over the table: any tokenization whose bytes are the text serves llguidance)."""

    bos_token_id = None

    def __init__(self, tokens: list[bytes], eos: int):
        self.tokens = tokens
        self.eos_token_id = eos
        self.special_token_ids = [i for i, t in enumerate(tokens) if t[:1] == b"\xff"]
        self._ids: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if t and t[:1] != b"\xff":
                self._ids.setdefault(t, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, data: bytes) -> list[int]:
        ids, i = [], 0
        while i < len(data):
            for j in range(min(len(data), i + self._longest), i, -1):
                tok = self._ids.get(data[i:j])
                if tok is not None:
                    ids.append(tok)
                    i = j
                    break
            else:
                i += 1  # a byte no token spells: nothing to emit for it
        return ids


class GrammarCompiler:
    """Compiles grammars for one tokenizer and vocabulary (the LM head's width, which T5 pads past the
    tokenizer). llguidance's tokenizer is built on first use (~1 s for a 32k SentencePiece vocabulary)."""

    def __init__(self, tokenizer, vocab: int, eos: int):
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab, eos
        self._ll = None
        self._lock = threading.Lock()

    def lltokenizer(self):
        with self._lock:
            if self._ll is None:
                self._ll = self._build()
            return self._ll

    def _build(self):
        import llguidance

        tok = self.tokenizer
        if type(tok).__name__.startswith("ByT5"):
            tokens = _byt5_tokens(tok, self.vocab)
        else:
            if getattr(tok, "is_fast", False):  # byte-level BPE and the like: llguidance reads tokenizer.json
                from llguidance.hf import from_tokenizer

                try:
                    return from_tokenizer(tok, n_vocab=self.vocab, eos_token=self.eos)
                except ValueError:  # e.g. T5's Metaspace decoder, which llguidance does not read
                    pass
            tokens = _piece_tokens(tok, self.vocab)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tokens, self.eos)), n_vocab=self.vocab)

    def compile(self, grammar: dict):
        """A matcher for `grammar` (check_grammar_shape's form), in its start state; 422 naming the problem."""
        import llguidance

        kind, value = grammar["type"], grammar["value"]
        if kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(value)
        else:
            try:
                text = llguidance.LLMatcher.grammar_from_json_schema(
                    value, defaults={"whitespace_flexible": grammar["whitespace"]})
            except ValueError as e:
                raise RequestValidationError(f"{FIELD}.value", f"invalid JSON schema: {e}") from None
        ll = self.lltokenizer()
        error = llguidance.LLMatcher.validate_grammar(text, ll)
        if error:
            what = "regex" if kind == "regex" else "JSON schema"
            raise RequestValidationError(f"{FIELD}.value", f"invalid {what}: {error.strip()}")
        matcher = llguidance.LLMatcher(ll, text, log_level=0)
        if matcher.is_error():
            raise RequestValidationError(f"{FIELD}.value", f"invalid grammar: {matcher.get_error()}")
        first = np.zeros((self.vocab + 31) // 32, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(first.ctypes.data, first.nbytes)
        first.view(np.uint32)[self.eos // 32] &= np.uint32(0xFFFFFFFF ^ (1 << (self.eos % 32)))
        if not first.any() and not matcher.is_accepting():  # (a dead end's mask holds only EOS)
            # e.g. T5's SentencePiece vocabulary has no token for "{": no JSON object can be written with it
            raise RequestValidationError(f"{FIELD}.value", "this model's tokenizer has no token that can start "
                                                           "the grammar's text (it cannot spell its first "
                                                           "character); this grammar cannot be served here")
        return matcher


@dataclass
class GrammarRow:
    """One row's parser state and the bitmask of tokens it may take next (bit t of word t // 32)."""

    matcher: object
    mask: np.ndarray

    @classmethod
    def start(cls, matcher, vocab: int) -> GrammarRow:
        row = cls(matcher, np.zeros((vocab + 31) // 32, dtype=np.int32))
        row.fill()
        return row

    def fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)

    def advance(self, token: int) -> None:
        """Take the sampled token and compute the next mask (the worker thread, during the next model step).
        A token the grammar refuses (only EOS when it was allowed ends a row) leaves the matcher in error:
        then only EOS stays allowed, so the row ends."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
        if self.matcher.is_error():
            self.mask[:] = 0
            return
        self.fill()

    def copy(self) -> GrammarRow:
        """A beam that continues another beam's text takes an independent copy of its parser."""
        return GrammarRow(self.matcher.deep_copy(), self.mask.copy())


def mask_rows(scores: torch.Tensor, rows: list[int], masks: list[np.ndarray], eos: int) -> None:
    """Set scores of disallowed tokens to -inf in `rows` (in place, `scores` contiguous). A row whose mask
    allows nothing (its parser stopped or refused a token) may only end: EOS stays allowed."""
    vocab = scores.shape[-1]
    words = np.stack(masks)
    allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # bit t of word t // 32
    empty = ~allowed.any(axis=1)
    if empty.any():
        allowed[empty, eos] = 1
    refused = torch.from_numpy(allowed).to(scores.device) == 0
    n = len(rows)
    if rows == list(range(n)):  # rows [0, n): in place on the slice
        scores[:n].masked_fill_(refused, float("-inf"))
        return
    idx = torch.tensor(rows, device=scores.device)
    scores.index_copy_(0, idx, scores.index_select(0, idx).masked_fill_(refused, float("-inf")))
