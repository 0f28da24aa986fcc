"""Own decoder step vs HF's forward; per-row positions; sampling determinism and filters."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import encoder_embedding
from serve.engine.decode import (
    KVCache,
    T5Parts,
    decode_step,
    encode,
    prefill_cross,
    project_vocab,
    tune_head,
)
from serve.engine.optimize import fuse_activations, fuse_rms_norms, optimize_base, transpose_linear_weights
from serve.engine.sampling import SamplingRow, filter_logits, sample


@pytest.fixture(scope="module")
def model_tok(tiny_base):
    return copy.deepcopy(tiny_base.model), tiny_base.tokenizer


def embed_inputs(model, input_ids):
    """The engine's encoder-input embedding (adapters.encoder_embedding), as the batch loop applies it."""
    return encoder_embedding(model)(input_ids)


def _hf(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, decoder_input_ids=dec).logits


def test_encoder_matches_hf_with_padding(model_tok):
    model, tok = model_tok
    parts = T5Parts.of(model)
    enc = tok(["a longer input sentence for the encoder", "short"], return_tensors="pt", padding=True)
    ours = encode(parts, embed_inputs(parts.model, enc.input_ids), enc.attention_mask)
    with torch.no_grad():
        ref = model.encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    real = enc.attention_mask.bool()
    assert (ours - ref)[real].abs().max() < 1e-4


def test_fused_gelu_keeps_hf_logits(model_tok):
    model, tok = model_tok
    fused = copy.deepcopy(model)
    assert fuse_activations(fused) == len(model.encoder.block) + len(model.decoder.block)
    assert fuse_activations(fused) == 0  # idempotent
    enc = tok(["the fused activation is the same formula"], return_tensors="pt")
    dec = torch.tensor([[0, 71, 104, 33]])
    assert (_hf(fused, enc, dec) - _hf(model, enc, dec)).abs().max() < 1e-5


def test_optimized_base_keeps_hf_logits_and_layout(model_tok):
    """The engine's rewrites (fused GELU and RMS norm, weights stored [in, out]) change no number beyond float
    rounding, leave the LM head's layout alone, and are idempotent."""
    model, tok = model_tok
    fast = copy.deepcopy(model)
    counts = optimize_base(fast)
    n_blocks = len(model.encoder.block) + len(model.decoder.block)
    assert counts["fused_gelu"] == n_blocks
    assert counts["fused_rms_norm"] == 2 * len(model.encoder.block) + 3 * len(model.decoder.block) + 2
    linears = [m for m in fast.modules() if type(m) is torch.nn.Linear]
    assert counts["transposed_linears"] == len(linears) - 1  # all but the head
    q = fast.encoder.block[0].layer[0].SelfAttention.q.weight
    assert q.shape == model.encoder.block[0].layer[0].SelfAttention.q.weight.shape and q.t().is_contiguous()
    assert fast.lm_head.weight.is_contiguous()
    assert (fuse_rms_norms(fast), transpose_linear_weights(fast, skip=(fast.lm_head,))) == (0, 0)
    enc = tok(["stored transposed, read the same", "short"], return_tensors="pt", padding=True)
    dec = torch.tensor([[0, 71, 104, 33], [0, 5, 6, 7]])
    assert (_hf(fast, enc, dec) - _hf(model, enc, dec)).abs().max() < 1e-5
    # and through the engine's own encoder + decoder step, against the untouched model's HF forward
    parts = T5Parts.of(fast)
    hidden = encode(parts, embed_inputs(fast, enc.input_ids), enc.attention_mask)
    kv = KVCache(parts, max_rows=2, max_target=8, max_source=enc.input_ids.shape[1])
    prefill_cross(parts, kv, [0, 1], hidden, enc.attention_mask)
    ref = _hf(model, enc, dec)
    for p in range(dec.shape[1]):
        logits = decode_step(parts, kv, dec[:, p], torch.full((2,), p))
        assert (logits - ref[:, p]).abs().max() < 1e-4


def test_decode_steps_match_hf_logits_rows_at_different_positions(model_tok):
    """Row A starts 3 steps before row B joins; each row's logits equal HF's full forward at its position."""
    model, tok = model_tok
    parts = T5Parts.of(model)
    texts = ["translate English to German: the house is small", "hi"]
    enc = tok(texts, return_tensors="pt", padding=True)
    dec = torch.tensor([[0, 71, 104, 33, 7, 90, 12], [0, 11, 12, 13, 14, 15, 16]])
    ref = _hf(model, enc, dec)
    cache = KVCache(parts, max_rows=4, max_target=16, max_source=64)
    hid_a = encode(parts, embed_inputs(parts.model, enc.input_ids[:1]), enc.attention_mask[:1])
    prefill_cross(parts, cache, [0], hid_a, enc.attention_mask[:1])
    for t in range(3):  # A alone
        logits = decode_step(parts, cache, dec[:1, t], torch.tensor([t]))
        assert (logits[0] - ref[0, t]).abs().max() < 1e-4
    b_ids, b_mask = enc.input_ids[1:, :4], enc.attention_mask[1:, :4]  # B without the padding tail
    hid_b = encode(parts, embed_inputs(parts.model, b_ids), b_mask)
    prefill_cross(parts, cache, [1], hid_b, b_mask)
    for t in range(4):  # A at position 3+t, B at position t in one step
        logits = decode_step(parts, cache, torch.stack([dec[0, 3 + t], dec[1, t]]), torch.tensor([3 + t, t]))
        assert (logits[0] - ref[0, 3 + t]).abs().max() < 1e-4
        assert (logits[1] - ref[1, t]).abs().max() < 1e-4


def test_move_row_compacts_without_changing_logits(model_tok):
    model, tok = model_tok
    parts = T5Parts.of(model)
    enc = tok(["first row", "second row is longer"], return_tensors="pt", padding=True)
    dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    ref = _hf(model, enc, dec)
    cache = KVCache(parts, max_rows=3, max_target=8, max_source=32)
    hid = encode(parts, embed_inputs(parts.model, enc.input_ids), enc.attention_mask)
    prefill_cross(parts, cache, [0, 1], hid, enc.attention_mask)
    for t in range(2):
        decode_step(parts, cache, dec[:, t], torch.tensor([t, t]))
    cache.move_row(1, 0, target_len=2)  # row 0 left; row 1 moves into its place
    for t in (2, 3):
        logits = decode_step(parts, cache, dec[1:, t], torch.tensor([t]))
        assert (logits[0] - ref[1, t]).abs().max() < 1e-4


def test_sampling_depends_only_on_own_generator_and_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)

    def rows(seeds):
        return [SamplingRow(True, 0.8, 20, 0.9, torch.Generator().manual_seed(s)) for s in seeds]

    alone = [sample(logits[i:i + 1], rows([s]), False)[0][0] for i, s in enumerate((1, 2, 3))]
    together, _ = sample(logits, rows((1, 2, 3)), False)
    assert together == alone
    greedy, lp = sample(logits, [SamplingRow(False, 1.0, 0, 1.0, None)] * 3, True)
    assert greedy == logits.argmax(-1).tolist()
    assert lp == pytest.approx(torch.log_softmax(logits, -1).max(-1).values.tolist(), abs=1e-6)


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.81)).tolist() == [True, True, True, False]


def test_weight_major_head_gives_the_same_logits(model_tok):
    import dataclasses

    model, tok = model_tok
    parts = T5Parts.of(model)
    enc = tok(["same logits either way", "hi"], return_tensors="pt", padding=True)
    outs = []
    for buckets in (frozenset(), frozenset({2})):
        p = dataclasses.replace(parts, head_weight_major=buckets)
        cache = KVCache(p, max_rows=2, max_target=4, max_source=32)
        prefill_cross(p, cache, [0, 1], encode(p, embed_inputs(p.model, enc.input_ids), enc.attention_mask),
                      enc.attention_mask)
        outs.append(decode_step(p, cache, torch.tensor([0, 0]), torch.tensor([0, 0])))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    w, h = torch.randn(50, 8), torch.randn(3, 8)
    assert not project_vocab(w, h, frozenset({2})).is_contiguous()  # 3 rows: bucket 2, weight-major
    torch.testing.assert_close(project_vocab(w, h, frozenset({2})), h @ w.T)
    assert project_vocab(w, h, frozenset({1, 4})).is_contiguous()  # bucket 2 not listed: the plain product


def test_tune_head_times_only_big_cpu_heads():
    assert tune_head(torch.randn(300, 64), max_rows=32) == frozenset()  # small: not timed
    got = tune_head(torch.randn(1 << 14, 256), max_rows=12, min_elements=1 << 20, repeats=1)
    assert got <= {1, 2, 4, 8}
