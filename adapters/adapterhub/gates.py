"""UniPELT's gates, per row: sigmoid of a linear map of the submodule's input, averaged over the sequence.

AdapterHub computes `mean(sigmoid(gate(x)), dim=1)`. What is served:
- encoder side (and the cross-attention keys/values, whose input is the encoder output): the mean over the
  row's REAL tokens (`token_mask`), never its padding — a row's result must not depend on its batch-mates;
- decoder side: each step's gate from that step's token (one token per row per step), as AdapterHub's cached
  `generate` computes it. Its full forward averages over the whole target instead, future tokens included,
  which no KV cache can serve (and generate, the way AdapterHub itself decodes, does not do).
"""

from __future__ import annotations

import torch


def row_gates(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, d], weight [B, k, d], bias [B, k] -> [B, k]: per row, the mean over its tokens of
    sigmoid(x·w + b). `token_mask` [B, T] (1 = real) restricts the mean to real tokens."""
    b = x.shape[0]
    x3 = x.reshape(b, -1, x.shape[-1])
    if x3.shape[1] == 1:  # a decoder step: one dot product per row and output (no batched GEMM of 1 x d by d x k)
        return torch.sigmoid(torch.linalg.vecdot(x3, weight.to(x.dtype)) + bias.to(x.dtype))
    g = torch.sigmoid(torch.baddbmm(bias.to(x.dtype)[:, None, :], x3, weight.to(x.dtype).transpose(1, 2)))  # [B, T, k]
    if token_mask is None or token_mask.shape[-1] != x3.shape[1]:
        return g.mean(dim=1)
    m = token_mask.to(g.dtype, copy=False)[:, :, None]
    return (g * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def gate_or_one(gates: torch.Tensor, gated: torch.Tensor | None) -> torch.Tensor:
    """Rows whose adapter has no gate here keep 1 (the submodule's own, ungated output). `gated` None: every
    row is gated."""
    if gated is None:
        return gates
    return torch.where(gated, gates, torch.ones((), dtype=gates.dtype, device=gates.device))
