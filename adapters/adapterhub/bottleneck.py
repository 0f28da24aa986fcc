"""Bottleneck adapters on one T5 sublayer, per row: seq_bn (Pfeiffer), double_seq_bn (Houlsby), par_bn.

`SublayerSlots` replaces the sublayer's residual add `r + h` (r = the sublayer's input, h = its output).
Every row's adapter has its own form (`BottleneckForm`: which of h and r feed the adapter and the residual,
layer norms, activation, scaling); the forms are per-row coefficient vectors, so one batched pass serves any
mix, and base rows (slot 0: zero weights, coefficients that give r + h) ride along unchanged:

    x   = c_xh·h + c_xr·r                 res = c_rh·h + c_rr·r
    a   = (act(LN_before(x) @ D + d) @ U + u) ⊙ scale · gate(x)
    out = LN_after(a + res)  if adapter_residual_before_ln  else  LN_after(a) + res
    y   = out + c_yr·r

The down/up projections are gathered per row ([B, d, k] and [B, k, d]) and run as batched matmuls; a batch
with one activation applies it once, a mix applies each of its few activations to its own rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlotError
from ..kinds import AdapterKind
from ..lora import group_rows
from .gates import gate_or_one, row_gates
from .weights import BottleneckForm, BottleneckWeights

IDENTITY_COEFFICIENTS = (0.0, 0.0, 1.0, 0.0, False, 1.0)  # x = 0, res = h, y = h + r


def _activation(name: str):
    from .load import _activation_fn

    return _activation_fn(name)


class SublayerSlots(nn.Module):
    """Stacked bottleneck adapters of one sublayer; slot index 0 is the identity (no adapter)."""

    def __init__(self, n: int, d_model: int, max_size: int, dtype, device, batch, path: str) -> None:
        super().__init__()
        self.path, self.batch, self.max_size = path, batch, max_size
        z = dict(dtype=dtype, device=device)
        self.register_buffer("down", torch.zeros(n + 1, d_model, max_size, **z), persistent=False)
        self.register_buffer("down_bias", torch.zeros(n + 1, max_size, **z), persistent=False)
        self.register_buffer("up", torch.zeros(n + 1, max_size, d_model, **z), persistent=False)
        self.register_buffer("up_bias", torch.zeros(n + 1, d_model, **z), persistent=False)
        self.register_buffer("scale", torch.zeros(n + 1, d_model, **z), persistent=False)
        # layer norms (weight, bias) before / after, and the gate; rows 2k / 2k+1 of `norms`
        self.register_buffer("norms", torch.zeros(n + 1, 4, d_model, **z), persistent=False)
        self.register_buffer("gate_weight", torch.zeros(n + 1, 1, d_model, **z), persistent=False)
        self.register_buffer("gate_bias", torch.zeros(n + 1, 1, **z), persistent=False)
        # host-side, per slot
        self.size = [0] * (n + 1)
        self.coefficients = [IDENTITY_COEFFICIENTS] * (n + 1)
        self.activation = ["relu"] * (n + 1)
        self.has_ln = [(False, False)] * (n + 1)
        self.gated = [False] * (n + 1)
        self._key = None
        self._cache = None

    def write(self, slot: int, form: BottleneckForm, weights: BottleneckWeights | None) -> None:
        self.clear(slot)
        if weights is None:
            return
        k = weights.size
        if k > self.max_size:
            raise SlotError(f"{self.path}: a {k}-unit bottleneck does not fit slots of {self.max_size} "
                            "(SlotConfig.max_bottleneck)")
        with torch.no_grad():
            self.down[slot, :, :k].copy_(weights.down.T)
            self.down_bias[slot, :k].copy_(weights.down_bias)
            self.up[slot, :k].copy_(weights.up.T)
            self.up_bias[slot].copy_(weights.up_bias)
            self.scale[slot].copy_(weights.scale)
            for i, pair in enumerate((weights.ln_before, weights.ln_after)):
                if pair is not None:
                    self.norms[slot, 2 * i].copy_(pair[0])
                    self.norms[slot, 2 * i + 1].copy_(pair[1])
            if weights.gate is not None:
                self.gate_weight[slot, 0].copy_(weights.gate[0])
                self.gate_bias[slot].copy_(weights.gate[1])
        self.size[slot] = k
        self.coefficients[slot] = form.coefficients()
        self.activation[slot] = form.activation
        self.has_ln[slot] = (weights.ln_before is not None, weights.ln_after is not None)
        self.gated[slot] = weights.gate is not None

    def clear(self, slot: int) -> None:
        if self.size[slot]:
            for t in (self.down, self.down_bias, self.up, self.up_bias, self.scale, self.norms, self.gate_weight,
                      self.gate_bias):
                t[slot].zero_()
        self.size[slot] = 0
        self.coefficients[slot] = IDENTITY_COEFFICIENTS
        self.has_ln[slot] = (False, False)
        self.gated[slot] = False

    def _gathered(self, index_host: tuple[int, ...], dtype: torch.dtype):
        key = (self.batch.version, dtype)
        if key == self._key:
            return self._cache
        k = max(self.size[s] for s in index_host)
        if k == 0:
            self._key, self._cache = key, None
            return None
        dev = self.down.device
        index = torch.tensor(index_host, dtype=torch.long, device=dev)
        rows_coeffs = [self.coefficients[s][:4] + (self.coefficients[s][5],) for s in index_host]
        active = {c for c, s in zip(rows_coeffs, index_host, strict=True) if self.size[s]}
        # One form for every adapter row (the usual batch): plain floats, and base rows may take that form too
        # when it gives them r + h (their a is zero): c_rh = 1 and c_rr + c_yr = 1.
        uniform = next(iter(active)) if len(active) == 1 else None
        if uniform is not None and not (uniform[2] == 1.0 and uniform[3] + uniform[4] == 1.0):
            uniform = None
        coeffs = (list(uniform) if uniform is not None else
                  [c.view(-1, 1, 1) for c in torch.tensor(rows_coeffs, dtype=dtype, device=dev).unbind(1)])
        arbl = [self.coefficients[s][4] for s in index_host]
        acts: dict[str, list[int]] = {}
        for row, s in enumerate(index_host):
            if self.size[s]:
                acts.setdefault(self.activation[s], []).append(row)
        act_rows = [(_activation(a), None if len(rows) == len(index_host) else
                     torch.tensor([r in rows for r in range(len(index_host))], device=dev).view(-1, 1, 1))
                    for a, rows in acts.items()]
        flags = {}
        for name, on in (("ln_before", [self.has_ln[s][0] for s in index_host]),
                         ("ln_after", [self.has_ln[s][1] for s in index_host]),
                         ("gated", [self.gated[s] for s in index_host]), ("arbl", arbl)):
            flags[name] = torch.tensor(on, device=dev).view(-1, 1, 1) if any(on) else None
        # rows sharing adapters: one weight per group, the rows packed into each group's GEMM (LoRA's rule)
        plan = group_rows(index_host)
        if plan is None:
            proj, groups = index, None
        else:
            slots, places, real, size = plan
            proj = torch.tensor(slots, dtype=torch.long, device=dev)
            in_order = all(real) and list(places) == list(range(len(index_host)))
            groups = (None if in_order else torch.tensor(places, dtype=torch.long, device=dev),
                      None if in_order else torch.tensor([p for p, ok in zip(places, real, strict=True) if ok],
                                                         dtype=torch.long, device=dev),
                      None if all(real) else torch.tensor(real, device=dev), size)
            act_rows = [(fn, None if only is None else torch.tensor(
                [self.activation[s] == name for s in slots], device=dev).view(-1, 1, 1))
                for (fn, only), name in zip(act_rows, acts, strict=True)]
        g = dict(
            down=self.down[:, :, :k].index_select(0, proj).to(dtype),
            down_bias=self.down_bias[:, :k].index_select(0, proj).to(dtype)[:, None, :],
            up=self.up[:, :k].index_select(0, proj).to(dtype),
            up_bias=self.up_bias.index_select(0, proj).to(dtype)[:, None, :], groups=groups,
            scale=self.scale.index_select(0, index).to(dtype)[:, None, :],
            norms=self.norms.index_select(0, index).to(dtype)[:, :, None, :],
            coeffs=coeffs, acts=act_rows, flags=flags,
            gate=(self.gate_weight.index_select(0, index).to(dtype), self.gate_bias.index_select(0, index).to(dtype))
            if flags["gated"] is not None else None,
            # rows that must keep gate 1: those with an ungated adapter here (base rows add a zero `a` anyway)
            gate_rows=flags["gated"][:, :, 0] if any(self.size[s] and not self.gated[s] for s in index_host)
            and flags["gated"] is not None else None)
        self._key, self._cache = key, g
        return g

    def drop_cache(self) -> None:
        self._key = self._cache = None

    def forward(self, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The sublayer's residual output for input r and sublayer output h ([B, T, d])."""
        rows = self.batch.rows
        if rows is None or AdapterKind.ADAPTERHUB not in rows.kinds:
            return r + h
        index_host = rows.slot_index(AdapterKind.ADAPTERHUB)
        if len(index_host) != h.shape[0]:
            raise SlotError(f"{self.path}: batch has {h.shape[0]} rows but set_rows described {len(index_host)}")
        g = self._gathered(index_host, h.dtype)  # once per batch version: decode steps reuse it
        if g is None:  # no row has an adapter on this sublayer
            return r + h
        c_xh, c_xr, c_rh, c_rr, c_yr = g["coeffs"]
        flags = g["flags"]
        x = _mix(h, c_xh, r, c_xr)
        res = _mix(h, c_rh, r, c_rr)
        x_in = x if flags["ln_before"] is None else _row_norm(x, g["norms"][:, 0], g["norms"][:, 1], flags["ln_before"])
        a = _project(x_in, g).mul_(g["scale"])
        if g["gate"] is not None:
            w, b = g["gate"]
            a = a * gate_or_one(row_gates(x, w, b, self.batch.token_mask), g["gate_rows"])[:, :, None]
        ln_after = flags["ln_after"]
        if ln_after is None:
            out = a + res
        else:
            w, b = g["norms"][:, 2], g["norms"][:, 3]
            out = _row_norm(a, w, b, ln_after) + res
            if flags["arbl"] is not None:
                out = torch.where(flags["arbl"], _row_norm(a + res, w, b, ln_after), out)
        return out + _mix(r, c_yr)


def _mix(a: torch.Tensor, ca, b: torch.Tensor | None = None, cb=0.0) -> torch.Tensor:
    """ca·a + cb·b with per-row [B, 1, 1] coefficients, or plain floats (0 and 1 cost nothing)."""
    if isinstance(ca, float) and isinstance(cb, float):
        terms = [t if c == 1.0 else t * c for t, c in ((a, ca), (b, cb)) if c != 0.0]
        if not terms:
            return torch.zeros_like(a)
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]
    out = a * ca
    return out if b is None else out + b * cb


def _project(x: torch.Tensor, g: dict) -> torch.Tensor:
    """up(act(down(x))) per row: one batched GEMM pair over rows ([B, d, k] weights), or over groups of rows
    that share an adapter (each group's rows side by side in one GEMM, then scattered back)."""
    groups = g["groups"]
    if groups is not None:
        places, real_places, real, size = groups
        b, t, d = x.shape
        xg = x if places is None else x.index_select(0, places)
        x = xg.reshape(-1, size * t, d)
    z = torch.baddbmm(g["down_bias"], x, g["down"])
    for fn, only in g["acts"]:
        z = fn(z) if only is None else torch.where(only, fn(z), z)
    a = torch.baddbmm(g["up_bias"], z, g["up"])
    if groups is None:
        return a
    a = a.view(-1, t, d)
    if places is None:
        return a
    if real is not None:
        a = a[real]
    return torch.zeros(b, t, d, dtype=a.dtype, device=a.device).index_copy_(0, real_places, a)


def _row_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm(d) (eps 1e-5) with each row's own weight/bias [B, 1, d], on rows where `on` [B, 1, 1]."""
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5) * weight + bias
    return torch.where(on, y, x)
