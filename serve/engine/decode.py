"""The decode loop as small functions over explicit state: encode, prefill_cross, decode_step (token choice:
serve/engine/sampling.py).

Why not `model.generate` / HF's past_key_values: continuous batching needs rows that join and leave
between steps at different decoder positions; HF's cache assumes one shared length. We call the model's
own submodules (layer norms, q/k/v/o, EncDecAttention, DenseReluDense, relative_attention_bias) so
adapter-wrapped linears apply automatically, and keep a preallocated KV cache with per-row lengths.

Row layout: running rows occupy cache rows [0, n) contiguously; a leaving row is replaced by the last row
(`KVCache.move_row`), so a step works on plain slices, never gathers.
Device split: every block runs on the device of its weights; hidden states follow (`.to(dev)`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.models.t5.modeling_t5 import T5Attention

from adapters.adapterhub.gates import gate_or_one, row_gates

NEG_INF = float("-inf")


def _dev(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass(frozen=True)
class T5Parts:
    """Static facts and module handles of a T5ForConditionalGeneration, read once."""

    model: torch.nn.Module
    n_heads: int
    d_kv: int
    num_buckets: int
    max_distance: int
    scale_output: float | None
    eos_token_id: int
    decoder_start_token_id: int
    dtype: torch.dtype
    # row-count buckets (powers of two) where the LM head runs as weight @ h.T; see `tune_head`
    head_weight_major: frozenset[int] = frozenset()

    @staticmethod
    def of(model) -> T5Parts:
        cfg = model.config
        scale = cfg.d_model**-0.5 if getattr(cfg, "scale_decoder_outputs", False) else None
        return T5Parts(model=model, n_heads=cfg.num_heads, d_kv=cfg.d_kv,
                       num_buckets=cfg.relative_attention_num_buckets,
                       max_distance=cfg.relative_attention_max_distance, scale_output=scale,
                       eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
                       dtype=model.lm_head.weight.dtype)

    @property
    def encoder_blocks(self):
        return self.model.encoder.block

    @property
    def decoder_blocks(self):
        return self.model.decoder.block

    def decoder_devices(self) -> list[torch.device]:
        return [_dev(b) for b in self.decoder_blocks]


def relative_bias(rel_emb: torch.nn.Embedding, relative_position: torch.Tensor, bidirectional: bool,
                  parts: T5Parts) -> torch.Tensor:
    """Bias [..., heads] for relative positions (memory - query), T5's bucketing."""
    buckets = T5Attention._relative_position_bucket(relative_position, bidirectional=bidirectional,
                                                    num_buckets=parts.num_buckets,
                                                    max_distance=parts.max_distance)
    return rel_emb(buckets.to(rel_emb.weight.device))


def _heads(x: torch.Tensor, parts: T5Parts) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]"""
    return x.view(x.shape[0], x.shape[1], parts.n_heads, parts.d_kv).transpose(1, 2)


def _attend_prefixed(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, bp: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, bias: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
    """`_attend` over prefix keys kp and the row's own keys k as one softmax, without concatenating K/V.

    `gates` [B, 2] (AdapterHub's prefix gates: keys by gate 0, values by gate 1) scale the prefix's scores
    and its value mix instead of the keys and values themselves: q·(g K) = g (q·K) and w·(g V) = g (w·V), on
    tensors P (scores) and d_kv (outputs) wide rather than P x d_kv."""
    sp = torch.matmul(q, kp.transpose(-1, -2))
    if gates is not None:
        sp = sp * gates[:, 0, None, None, None].to(sp.dtype)
    sp = sp + bp
    ss = torch.matmul(q, k.transpose(-1, -2)) + bias
    weights = torch.softmax(torch.cat((sp, ss), dim=-1).float(), dim=-1).to(v.dtype)
    p = kp.shape[-2]
    mixed = torch.matmul(weights[..., :p], vp)
    if gates is not None:
        mixed = mixed * gates[:, 1, None, None, None].to(mixed.dtype)
    out = mixed + torch.matmul(weights[..., p:], v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5 attention: no 1/sqrt(d) scaling; `bias` carries position bias and -inf masking. -> [B, S, H*D]"""
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


# ---- encoder ---------------------------------------------------------------------------------------

def sublayer_residual(layer: torch.nn.Module, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A T5 sublayer's residual output r + h (r its input, h its output), or, where the model carries
    per-row bottleneck adapters on it (`adapters` attaches `peftserve_bottleneck`), theirs."""
    adapters = getattr(layer, "peftserve_bottleneck", None)
    return r + h if adapters is None else adapters(r, h)


def _dense(dense: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """T5's FFN: HF's T5DenseActDense / T5DenseGatedActDense without dropout, the gate multiplied in place.
    As in HF, the input of `wo` takes wo's dtype where they differ (`_keep_in_fp32_modules = ["wo"]`)."""
    wi_0 = getattr(dense, "wi_0", None)
    h = dense.act(dense.wi(x)) if wi_0 is None else dense.act(wi_0(x)).mul_(dense.wi_1(x))
    wo = getattr(dense.wo, "base_layer", dense.wo)  # through an adapter wrapper
    if isinstance(wo, torch.nn.Linear) and h.dtype != wo.weight.dtype:  # (an int8 wo takes float32 as it is)
        h = h.to(wo.weight.dtype)
    return dense.wo(h)


def _feed_forward(ff: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """T5LayerFF (norm, (gated) FFN, residual), with the residual through `sublayer_residual`."""
    return sublayer_residual(ff, h, _dense(ff.DenseReluDense, ff.layer_norm(h)))


def _prefix_gates(x: torch.Tensor, weight, bias, gated, token_mask=None) -> torch.Tensor:
    """AdapterHub's prefix gates per row [B, 2] (keys, values) from the attention's query-side input x;
    rows without gates keep 1 (`gated` True: every row that has a prefix is gated)."""
    g = row_gates(x, weight, bias, token_mask)
    return g if gated is True else gate_or_one(g, gated[:, None])


def _gated_prefix(k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor):
    """Prefix keys/values [B, H, P, D] scaled by per-row gates [B, 2] (the encoder's concatenated attention)."""
    return k * gates[:, 0, None, None, None].to(k.dtype), v * gates[:, 1, None, None, None].to(v.dtype)


def _encoder_bias(parts: T5Parts, rel_emb, attention_mask: torch.Tensor, prefix) -> torch.Tensor:
    """Additive bias [B, H, S, P + S]: T5's bidirectional position bias plus -inf on padding. With AdapterHub
    encoder prefixes (P = the batch's longest), prefix key j sits at position j and the row's own token s at
    m + s (m = the row's prefix length) against the query at i, as AdapterHub computes them; prefix keys past
    a row's m are masked."""
    seq = attention_mask.shape[1]
    dev = rel_emb.weight.device
    pos = torch.arange(seq, device=dev)
    pad = torch.zeros(attention_mask.shape, dtype=rel_emb.weight.dtype, device=dev)
    pad.masked_fill_(attention_mask.to(dev) == 0, NEG_INF)
    if prefix is None:
        bias = relative_bias(rel_emb, pos[None, :] - pos[:, None], True, parts).permute(2, 0, 1)[None]
        return bias + pad[:, None, None, :]
    m = torch.tensor(prefix.lengths, device=dev)
    j = torch.arange(prefix.width, device=dev)
    own = relative_bias(rel_emb, m[:, None, None] + pos[None, None, :] - pos[None, :, None], True, parts)
    ahead = relative_bias(rel_emb, j[None, :] - pos[:, None], True, parts)[None].expand(len(m), -1, -1, -1)
    ahead = ahead.masked_fill((j[None, :] >= m[:, None])[:, None, :, None], NEG_INF)
    return torch.cat((ahead, own), dim=2).permute(0, 3, 1, 2) + torch.cat(
        (torch.zeros(len(m), prefix.width, dtype=pad.dtype, device=dev), pad), dim=1)[:, None, None, :]


@torch.inference_mode()
def encode(parts: T5Parts, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, prefix=None) -> torch.Tensor:
    """Encoder stack over [B, S, d] embeddings with a [B, S] 0/1 mask -> last hidden state [B, S, d].

    Rows are independent: padding keys are masked, so a row's output does not depend on its batch-mates.
    `prefix` (adapters' EncoderPrefix, or None): per-row AdapterHub prefixes before every layer's keys.
    """
    blocks = parts.encoder_blocks
    rel_emb = blocks[0].layer[0].SelfAttention.relative_attention_bias
    bias = _encoder_bias(parts, rel_emb, attention_mask, prefix)
    h = inputs_embeds
    bias_on: dict[torch.device, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        dev = _dev(block)
        h = h.to(dev)
        b = bias_on.setdefault(dev, bias.to(dev, h.dtype))
        sa = block.layer[0]
        x = sa.layer_norm(h)
        att = sa.SelfAttention
        q, k, v = _heads(att.q(x), parts), _heads(att.k(x), parts), _heads(att.v(x), parts)
        if prefix is not None:
            kp, vp = prefix.keys[i].to(dev, k.dtype), prefix.values[i].to(dev, v.dtype)
            if prefix.gated is not None:
                kp, vp = _gated_prefix(kp, vp, _prefix_gates(x, prefix.gate_weight[i], prefix.gate_bias[i],
                                                             prefix.gated.to(dev), attention_mask.to(dev)))
            k, v = torch.cat((kp, k), dim=2), torch.cat((vp, v), dim=2)
        h = sublayer_residual(sa, h, att.o(_attend(q, k, v, b)))
        h = _feed_forward(block.layer[-1], h)
    norm = parts.model.encoder.final_layer_norm
    return norm(h.to(_dev(norm)))


# ---- KV cache --------------------------------------------------------------------------------------

class KVCache:
    """Preallocated per decoder layer, on that layer's device.

    self_k/self_v: [rows, heads, max_new_tokens, d_kv]; cross_k/cross_v: [rows, heads, max_source, d_kv];
    cross_mask: [rows, max_source] additive (0 / -inf) on each layer's device.
    prefix_k/prefix_v: [rows, heads, max_prefix, d_kv] (prefix tuning: keys/values before the row's own
    self-attention keys); prefix_len[r] tokens of row r are real, in decoder layers [0, prefix_layers[r]).
    With `adapterhub`, also the cross-attention's prefixes (cross_prefix_k/v, cross_prefix_len) and both
    prefixes' gate weights per row ([rows, 2, d_model], [rows, 2]); prefix_shifted[r] marks AdapterHub's
    position convention (`adapters.prefix.DecoderPrefixes.shifted`).
    """

    def __init__(self, parts: T5Parts, max_rows: int, max_target: int, max_source: int, max_prefix: int = 0,
                 adapterhub: bool = False):
        self.max_rows, self.max_target, self.max_source = max_rows, max_target, max_source
        self.max_prefix = max_prefix
        h, d, dt = parts.n_heads, parts.d_kv, parts.dtype
        self.devices = parts.decoder_devices()
        self.self_k = [torch.zeros(max_rows, h, max_target, d, dtype=dt, device=dev) for dev in self.devices]
        self.self_v = [torch.zeros_like(t) for t in self.self_k]
        self.cross_k = [torch.zeros(max_rows, h, max_source, d, dtype=dt, device=dev) for dev in self.devices]
        self.cross_v = [torch.zeros_like(t) for t in self.cross_k]
        self.prefix_k = [torch.zeros(max_rows, h, max_prefix, d, dtype=dt, device=dev)
                         for dev in self.devices] if max_prefix else []
        self.prefix_v = [torch.zeros_like(t) for t in self.prefix_k]
        hub = adapterhub and max_prefix > 0
        d_model = parts.model.config.d_model
        self.cross_prefix_k = [torch.zeros_like(t) for t in self.prefix_k] if hub else []
        self.cross_prefix_v = [torch.zeros_like(t) for t in self.prefix_k] if hub else []
        # gate weights (key gate, value gate) per row and layer: self prefix, then cross prefix
        self.gate_w = [[torch.zeros(max_rows, 2, d_model, dtype=dt, device=dev) for dev in self.devices]
                       for _ in range(2)] if hub else [[], []]
        self.gate_b = [[torch.zeros(max_rows, 2, dtype=dt, device=dev) for dev in self.devices]
                       for _ in range(2)] if hub else [[], []]
        first = self.devices[0]
        self.cross_bias = torch.full((max_rows, max_source), NEG_INF, dtype=dt, device=first)
        self.source_len = [0] * max_rows
        self.prefix_len = [0] * max_rows
        self.prefix_layers = [0] * max_rows
        self.prefix_shifted = [False] * max_rows
        self.cross_prefix_len = [0] * max_rows
        self.gated = [[False] * max_rows, [False] * max_rows]  # self prefix, cross prefix

    def _tensors(self) -> list[torch.Tensor]:
        return (self.self_k + self.self_v + self.cross_k + self.cross_v + self.prefix_k + self.prefix_v
                + self.cross_prefix_k + self.cross_prefix_v + sum(self.gate_w, []) + sum(self.gate_b, []))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def prefix_row_bytes(self) -> int:
        """KV-cache bytes one row's prefix region takes (all layers, keys and values)."""
        return sum(2 * t[0].numel() * t.element_size() for t in self.prefix_k + self.cross_prefix_k)

    def set_prefixes(self, first: int, count: int, prefixes) -> None:
        """Copy joining rows' decoder-side prefixes (`adapters.prefix.DecoderPrefixes`, stacked; None = none)
        into cache rows [first, first + count): one copy per layer and tensor, whatever the row count."""
        rows = slice(first, first + count)
        if prefixes is None:
            self.prefix_len[rows] = self.prefix_layers[rows] = self.cross_prefix_len[rows] = [0] * count
            self.prefix_shifted[rows] = self.gated[0][rows] = self.gated[1][rows] = [False] * count
            return
        widest = max(max(prefixes.lengths), max(prefixes.cross_lengths, default=0))
        if widest > self.max_prefix:
            raise ValueError(f"a {widest}-token prefix exceeds the cache's {self.max_prefix}")
        hub = any(prefixes.shifted) or any(prefixes.cross_lengths)
        if hub and not self.cross_prefix_k:
            raise ValueError("this KV cache has no room for AdapterHub prefixes (KVCache(adapterhub=True))")
        for dst, src in ((self.prefix_k, prefixes.keys), (self.prefix_v, prefixes.values),
                         (self.cross_prefix_k, prefixes.cross_keys), (self.cross_prefix_v, prefixes.cross_values)):
            for i, t in enumerate(src[:len(dst)]):
                dst[i][rows, :, :t.shape[2]] = t
        for side, (w, b) in enumerate(((prefixes.gate_weight, prefixes.gate_bias),
                                       (prefixes.cross_gate_weight, prefixes.cross_gate_bias))):
            flags = (prefixes.gated, prefixes.cross_gated)[side] or [False] * count
            self.gated[side][rows] = flags
            for i in range(len(self.gate_w[side]) if w is not None else 0):
                self.gate_w[side][i][rows] = w[i]
                self.gate_b[side][i][rows] = b[i]
        self.prefix_len[rows] = prefixes.lengths
        self.prefix_layers[rows] = [k if n else 0 for k, n in zip(prefixes.layers, prefixes.lengths, strict=True)]
        self.prefix_shifted[rows] = prefixes.shifted
        self.cross_prefix_len[rows] = prefixes.cross_lengths or [0] * count

    def move_row(self, src: int, dst: int, target_len: int) -> None:
        """Copy row `src` into row `dst` (compaction after `dst` left). Copies only the filled prefix."""
        s = self.source_len[src]
        for i in range(len(self.devices)):
            self.self_k[i][dst, :, :target_len] = self.self_k[i][src, :, :target_len]
            self.self_v[i][dst, :, :target_len] = self.self_v[i][src, :, :target_len]
            self.cross_k[i][dst, :, :s] = self.cross_k[i][src, :, :s]
            self.cross_v[i][dst, :, :s] = self.cross_v[i][src, :, :s]
        p = self.prefix_len[src]
        for i in range(min(self.prefix_layers[src], len(self.prefix_k))):
            self.prefix_k[i][dst, :, :p] = self.prefix_k[i][src, :, :p]
            self.prefix_v[i][dst, :, :p] = self.prefix_v[i][src, :, :p]
        c = self.cross_prefix_len[src]
        for i in range(len(self.cross_prefix_k) if c else 0):
            self.cross_prefix_k[i][dst, :, :c] = self.cross_prefix_k[i][src, :, :c]
            self.cross_prefix_v[i][dst, :, :c] = self.cross_prefix_v[i][src, :, :c]
        for side in range(2):
            self.gated[side][dst] = self.gated[side][src]
            for i in range(len(self.gate_w[side]) if self.gated[side][src] else 0):
                self.gate_w[side][i][dst] = self.gate_w[side][i][src]
                self.gate_b[side][i][dst] = self.gate_b[side][i][src]
        self.prefix_len[dst], self.prefix_layers[dst] = p, self.prefix_layers[src]
        self.prefix_shifted[dst], self.cross_prefix_len[dst] = self.prefix_shifted[src], c
        self.cross_bias[dst] = self.cross_bias[src]
        self.source_len[dst] = s

    def copy_rows(self, dst: list[int], src: list[int], target_len: int) -> None:
        """Beam search: rows `dst` continue rows `src` (all read before any is written). Only the self-attention
        K/V differ between the beams of one request: their cross K/V and prefixes are the same."""
        d, s = torch.tensor(dst), torch.tensor(src)
        on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, dev in enumerate(self.devices):
            di, si = on.setdefault(dev, (d.to(dev), s.to(dev)))
            for t in (self.self_k[i], self.self_v[i]):
                filled = t.narrow(2, 0, target_len)
                filled.index_copy_(0, di, filled.index_select(0, si))


@torch.inference_mode()
def prefill_cross(parts: T5Parts, cache: KVCache, rows: list[int], encoder_hidden: torch.Tensor,
                  attention_mask: torch.Tensor) -> None:
    """Compute cross-attention K/V once per joining row (EncDecAttention.k/v, adapters applied) into `rows`."""
    seq = encoder_hidden.shape[1]
    if seq > cache.max_source:
        raise ValueError(f"source of {seq} tokens exceeds the cache's {cache.max_source}")
    idx = torch.tensor(rows, dtype=torch.long)
    for i, block in enumerate(parts.decoder_blocks):
        dev = cache.devices[i]
        x = encoder_hidden.to(dev)
        att = block.layer[1].EncDecAttention
        cache.cross_k[i][idx.to(dev), :, :seq] = _heads(att.k(x), parts)
        cache.cross_v[i][idx.to(dev), :, :seq] = _heads(att.v(x), parts)
    bias = torch.full((len(rows), cache.max_source), NEG_INF, dtype=cache.cross_bias.dtype,
                      device=cache.cross_bias.device)
    bias[:, :seq].masked_fill_(attention_mask.to(bias.device) != 0, 0.0)
    cache.cross_bias[idx.to(bias.device)] = bias
    for r, n in zip(rows, attention_mask.sum(dim=1).tolist(), strict=True):
        # Keys beyond a row's own (masked) length are never attended; keep the padded width for the slice.
        cache.source_len[r] = seq if n else 0


@torch.inference_mode()
def decode_step(parts: T5Parts, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decoder step for cache rows [0, n): `tokens[r]` sits at decoder position `positions[r]`.

    Writes each row's self-attention K/V at its own position and returns fp32 logits [n, vocab].
    """
    n = tokens.shape[0]
    blocks = parts.decoder_blocks
    emb = parts.model.decoder.embed_tokens
    h = emb(tokens.to(emb.weight.device))[:, None, :]  # [n, 1, d]
    t_len = int(positions.max()) + 1
    s_len = max(cache.source_len[:n])
    rel_emb = blocks[0].layer[0].SelfAttention.relative_attention_bias
    pos = positions.to(rel_emb.weight.device)
    mem = torch.arange(t_len, device=pos.device)
    own = mem[None, :] - pos[:, None]
    if any(cache.prefix_shifted[:n]):  # AdapterHub prefixes: the row's own keys sit after its prefix
        shift = [m if s else 0 for m, s in zip(cache.prefix_len[:n], cache.prefix_shifted[:n], strict=True)]
        own = own + torch.tensor(shift, device=pos.device)[:, None]
    self_bias = relative_bias(rel_emb, own, False, parts)  # [n, T, H]
    self_bias = self_bias.permute(0, 2, 1)[:, :, None, :].clone()  # [n, H, 1, T]
    self_bias.masked_fill_((mem[None, :] > pos[:, None])[:, None, None, :], NEG_INF)
    cross_bias = cache.cross_bias[:n, None, None, :s_len]  # [n, 1, 1, S]
    prefix = _prefix_bias(parts, cache, rel_emb, pos, n)  # None when no running row has a prefix
    cross_prefix = _cross_prefix_bias(cache, n, cross_bias)
    gated = [_gate_rows(g[:n], lens[:n]) for g, lens in zip(cache.gated, (cache.prefix_len, cache.cross_prefix_len),
                                                             strict=True)]
    row_idx = torch.arange(n)
    on_dev: dict[torch.device, tuple] = {}
    for i, block in enumerate(blocks):
        dev = cache.devices[i]
        h = h.to(dev)
        if dev not in on_dev:
            on_dev[dev] = (self_bias.to(dev, h.dtype), cross_bias.to(dev, h.dtype), row_idx.to(dev),
                           positions.to(dev), [g if g is None or g is True else g.to(dev) for g in gated],
                           None if cross_prefix is None else cross_prefix.to(dev, h.dtype))
        sb, cb, ri, pi, gd, cpb = on_dev[dev]
        sa = block.layer[0]
        x = sa.layer_norm(h)
        att = sa.SelfAttention
        k_all, v_all = cache.self_k[i], cache.self_v[i]
        k_all[ri, :, pi] = att.k(x)[:, 0].view(n, parts.n_heads, parts.d_kv)
        v_all[ri, :, pi] = att.v(x)[:, 0].view(n, parts.n_heads, parts.d_kv)
        q = _heads(att.q(x), parts)
        pb = None if prefix is None else prefix(i, dev, h.dtype)
        if pb is None:
            out = _attend(q, k_all[:n, :, :t_len], v_all[:n, :, :t_len], sb)
        else:
            p_len = pb.shape[-1]
            kp, vp = cache.prefix_k[i][:n, :, :p_len], cache.prefix_v[i][:n, :, :p_len]
            # gates from this step's token (the cached prefix itself stays ungated)
            g = None if gd[0] is None else _prefix_gates(x, cache.gate_w[0][i][:n], cache.gate_b[0][i][:n], gd[0])
            out = _attend_prefixed(q, kp, vp, pb, k_all[:n, :, :t_len], v_all[:n, :, :t_len], sb, g)
        h = sublayer_residual(sa, h, att.o(out))
        ca = block.layer[1]
        x = ca.layer_norm(h)
        catt = ca.EncDecAttention
        q = _heads(catt.q(x), parts)
        k, v = cache.cross_k[i][:n, :, :s_len], cache.cross_v[i][:n, :, :s_len]
        if cpb is None:
            out = _attend(q, k, v, cb)
        else:
            c_len = cpb.shape[-1]
            kp, vp = cache.cross_prefix_k[i][:n, :, :c_len], cache.cross_prefix_v[i][:n, :, :c_len]
            g = None if gd[1] is None else _prefix_gates(x, cache.gate_w[1][i][:n], cache.gate_b[1][i][:n], gd[1])
            out = _attend_prefixed(q, kp, vp, cpb, k, v, cb, g)
        h = sublayer_residual(ca, h, catt.o(out))
        h = _feed_forward(block.layer[-1], h)
    norm = parts.model.decoder.final_layer_norm
    h = norm(h.to(_dev(norm)))
    if parts.scale_output is not None:
        h = h * parts.scale_output
    head = parts.model.lm_head
    if not isinstance(head, torch.nn.Linear):  # the int8 base's head (serve/engine/int8.py), on the CPU
        return head(h[:, 0].cpu()).float()
    return project_vocab(head.weight, h.to(head.weight.device)[:, 0], parts.head_weight_major).float()


def _gate_rows(gated: list[bool], lengths: list[int]):
    """Which rows' prefixes a layer's gates scale: None = no row is gated; True = every row (rows without a
    prefix have nothing to scale); else a [n] bool tensor (rows with an ungated prefix keep theirs)."""
    if not any(gated):
        return None
    if all(g or not m for g, m in zip(gated, lengths, strict=True)):
        return True
    return torch.tensor(gated)


def _cross_prefix_bias(cache: KVCache, n: int, like: torch.Tensor) -> torch.Tensor | None:
    """[n, 1, 1, P] additive mask for the rows' cross-attention prefix keys (cross-attention has no position
    bias), or None when no running row has one."""
    lens = cache.cross_prefix_len[:n]
    width = max(lens) if lens else 0
    if width == 0:
        return None
    j = torch.arange(width, device=like.device)
    bias = torch.zeros(n, 1, 1, width, dtype=like.dtype, device=like.device)
    return bias.masked_fill_((j[None, :] >= torch.tensor(lens, device=like.device)[:, None])[:, None, None, :], NEG_INF)


def _prefix_bias(parts: T5Parts, cache: KVCache, rel_emb, pos: torch.Tensor, n: int):
    """Per-layer additive bias [n, H, 1, P] for the rows' prefix keys, or None when no row has one.

    peft: prefix key j of a row with an m-token prefix sits at relative position j - m - p from the query at
    decoder position p (transformers starts the decoder's cache_position at the prefix length). AdapterHub
    (`prefix_shifted`): at j - p (its queries keep their own positions; the own keys move instead). Keys
    past a row's m, and every key in layers at or past the row's prefix_layers, are masked."""
    if not cache.prefix_k:
        return None
    lens = cache.prefix_len[:n]
    p_len = max(lens)
    if p_len == 0:
        return None
    m = torch.tensor(lens, device=pos.device)
    offset = torch.tensor([0 if s else k for k, s in zip(lens, cache.prefix_shifted[:n], strict=True)], device=pos.device)
    j = torch.arange(p_len, device=pos.device)
    bias = relative_bias(rel_emb, j[None, :] - offset[:, None] - pos[:, None], False, parts)  # [n, P, H]
    bias = bias.permute(0, 2, 1)[:, :, None, :].clone()
    bias.masked_fill_((j[None, :] >= m[:, None])[:, None, None, :], NEG_INF)
    layers = cache.prefix_layers[:n]
    cut = sorted({k for k in layers if k < len(cache.prefix_k)})  # layers where some rows' prefixes end
    masks = {}
    for i in cut:
        masks[i] = torch.tensor([k <= i for k in layers], device=pos.device)[:, None, None, None]
    on: dict = {}

    def for_layer(i: int, dev, dtype):
        ended = [k for k in cut if k <= i]
        key = (dev, dtype, ended[-1] if ended else None)
        if key not in on:
            b = bias if not ended else bias.masked_fill(masks[ended[-1]], NEG_INF)
            on[key] = b.to(dev, dtype)
        return on[key]

    return for_layer


def project_vocab(weight: torch.Tensor, h: torch.Tensor, weight_major: frozenset[int] = frozenset()) -> torch.Tensor:
    """Logits [rows, vocab] = h @ weight.T (T5's LM head has no bias). When the row count's power-of-two
    bucket is in `weight_major` it is computed as (weight @ h.T).T: the same product with the vocab as
    the GEMM's long side, which some BLAS kernels run much faster for a few rows (`tune_head`)."""
    if weight_major and 1 << (h.shape[0].bit_length() - 1) in weight_major:
        return torch.mm(weight, h.T).T
    return torch.nn.functional.linear(h, weight)


def tune_head(weight: torch.Tensor, max_rows: int, min_elements: int = 1 << 22, repeats: int = 3) -> frozenset[int]:
    """Row-count buckets (powers of two up to `max_rows`) where `project_vocab` should use the weight-major
    product: timed on this device, kept where it wins by more than 10 %. Why: on the development CPU (MKL,
    fp32, flan-t5-small's 32128 x 512 head) `h @ W.T` took 31 ms for 10 rows but 17 ms for 16, while
    `W @ h.T` took ~15 ms for 8-16 rows. Only CPU heads of at least `min_elements` are timed (~1 s at
    startup): small heads take microseconds either way, and GPU BLAS libraries choose their kernels well."""
    if weight.device.type != "cpu" or weight.numel() < min_elements:
        return frozenset()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    wins = set()
    with torch.no_grad():
        for m in (1 << k for k in range(max_rows.bit_length())):
            h = torch.randn(m, weight.shape[1], dtype=weight.dtype)
            if best(lambda h=h: torch.mm(weight, h.T)) < 0.9 * best(lambda h=h: torch.nn.functional.linear(h, weight)):
                wins.add(m)
    return frozenset(wins)
