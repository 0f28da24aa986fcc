"""The int8 base (`dtype: int8`): every base linear and the LM head hold int8 weights; everything else, and
every adapter, stays float32 and per row, as QLoRA serving does.

`Int8Linear` runs torch's own dynamic quantized linear (`torch.ops.quantized.linear_dynamic`) on oneDNN:
weights quantized once, per output channel, symmetric; activations quantized inside the kernel, output in
float32. Measured on the development CPU, one thread (docs/PERFORMANCE.md): 32 rows x 512x1024 in 51 us
against 229 us in float32, 1024 rows 0.8 ms against 6.5 ms, the LM head (32 rows x 32,128) 1.0 ms against
15 ms. fbgemm, torch's other x86 engine, was faster for 1-8 rows but 1.6-2.5x slower from 32 rows on, and
quantizes activations to 7 bits: not used.

Activations are quantized per row. The kernel takes one (min, max) range per call, so a row far smaller than
its batch-mates would keep only a few of its 256 levels (measured: 10-100 % error on such rows) and a row's
result would depend on who shares its batch. Each row is therefore divided by its own largest magnitude
first, two fixed rows holding +1 and -1 go before them (in a per-thread scratch buffer) so that every call's
range is exactly [-1, 1], and the output rows are multiplied back: per-row 8-bit quantization (1.1-2 % error
on every row) on a grid that never depends on the batch-mates. (A row's float32 inputs may still differ from its solo run by a float rounding,
e.g. when padding changes how a sum is blocked; a value right at a rounding boundary then lands one level
apart.) CPU only: CUDA has no kernel behind these ops, and `EngineConfig` refuses
`dtype: int8` with a CUDA device.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch import nn

ENGINE = "onednn"
_SCRATCH = threading.local()  # per thread: the engine's loop thread owns its buffers, and they die with it
_SCRATCH_ROWS = 256  # buffers grow in steps of this many rows
_SCRATCH_MAX_ROWS = 4096  # larger calls (long encoder passes) get a buffer of their own: nothing that size is kept


def _scaled_rows(n: int, width: int) -> torch.Tensor:
    """A [2 + n, width] view of this thread's scratch buffer for `width`-wide inputs whose first two rows hold
    +1 and -1 (written once, at allocation): the caller writes its n scaled rows after them. One buffer per
    width and thread, shared by every Int8Linear of that width: calls on one thread never overlap, and
    allocating and filling a fresh input per call cost 10-15 % of a 32-row call. At most `_SCRATCH_MAX_ROWS` rows
    are kept per width (16 MiB at width 1024)."""
    if n + 2 > _SCRATCH_MAX_ROWS:
        return _with_span_rows(torch.empty(n + 2, width))
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get(width)
    if buf is None or buf.shape[0] < n + 2:
        buf = pool[width] = _with_span_rows(torch.zeros(min(-(-(n + 2) // _SCRATCH_ROWS) * _SCRATCH_ROWS,
                                                            _SCRATCH_MAX_ROWS), width))
    return buf[:n + 2]


def _with_span_rows(buf: torch.Tensor) -> torch.Tensor:
    buf[:2] = 0.0
    buf[0, 0], buf[1, 0] = 1.0, -1.0
    return buf


@contextlib.contextmanager
def _quantized_engine(name: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def available() -> str | None:
    """Why the int8 base cannot run here, or None when it can."""
    if ENGINE not in torch.backends.quantized.supported_engines:
        return f"this torch build has no {ENGINE} quantized engine"
    return None


class Int8Linear(nn.Module):
    """y = x @ dequant(W_int8).T (+ bias), with W quantized per output channel. Stands where an nn.Linear stood:
    same in/out features, float32 in and out, any leading dimensions."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().contiguous()
        scale = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()) / 127.0).clamp_min(1e-12)
        # torch marks quantized tensors deprecated in favour of torchao; its eager CPU path (quantize in Python,
        # then torch._int_mm) measured 1.5-4x slower than this kernel here (docs/PERFORMANCE.md)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
                                                 torch.qint8)
        # the bias is added after the rows are scaled back (the kernel would add it to the scaled rows)
        self._bias = None if linear.bias is None else linear.bias.detach().float().clone()
        with _quantized_engine(ENGINE):  # the packed form is the only copy kept
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.device = torch.device("cpu")

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer computes with (unpacked and dequantized on each access: for DoRA's norms
        at slot writes and for tests, never on the hot path)."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()

    @property
    def bias(self) -> torch.Tensor | None:
        return self._bias

    def nbytes(self) -> int:
        """Bytes of the int8 weight and its per-channel scales (the packed form's payload)."""
        return self.in_features * self.out_features + 8 * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        magnitude = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_()).clamp_(min=1e-30)
        scaled = _scaled_rows(rows.shape[0], self.in_features)  # rows 0-1: +1 and -1, every call's range [-1, 1]
        torch.div(rows, magnitude, out=scaled[2:])
        y = torch.ops.quantized.linear_dynamic(scaled, self._packed, False)[2:].mul_(magnitude)
        if self._bias is not None:
            y += self._bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(model: nn.Module) -> dict[str, int]:
    """Replace every linear of the model by an Int8Linear, in place: a bare nn.Linear where it stands, and the
    base layer inside an adapter-wrapped linear (which keeps its float32 adapter slots). Returns the
    counts and the bytes the float weights took and the int8 ones take."""
    float_bytes = int8_bytes = count = 0
    for path, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear:
            continue
        parent_path, _, attr = path.rpartition(".")
        holder = model.get_submodule(parent_path) if parent_path else model
        if linear.weight.device.type != "cpu":
            raise ValueError(f"{path}: the int8 base runs on the CPU only; this linear is on {linear.weight.device}")
        q = Int8Linear(linear)
        float_bytes += linear.weight.numel() * linear.weight.element_size()
        int8_bytes += q.nbytes()
        if attr == "base_layer":
            holder.replace_base_layer(q)  # an adapter-wrapped linear (adapters.AdaptedLinear)
        else:
            setattr(holder, attr, q)
        count += 1
    return {"int8_linears": count, "float_weight_bytes": float_bytes, "int8_weight_bytes": int8_bytes}
