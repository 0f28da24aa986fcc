"""Reading an adapter directory safely: adapter_config.json + the safetensors header, with size caps.

Nothing here imports code named by the config (auto_map, custom classes are ignored) and nothing
ever unpickles: a directory holding only .bin/.pt/.pkl weights is refused without opening the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterLimitError, AdapterNotFoundError, CorruptAdapterError, UnsafeAdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTERHUB_WEIGHTS_FILE = "adapter.safetensors"  # AdapterHub's save_adapter(..., use_safetensors=True)
ADAPTERHUB_PICKLE = "pytorch_adapter.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KB
MAX_HEADER_BYTES = 16 << 20  # safetensors' own reader caps its header at 100 MB; adapters need far less

# safetensors dtype code -> (torch dtype, bytes per element); only floating weights make sense here
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class AdapterFiles:
    path: Path
    config: dict
    weights: Path
    tensors: dict[str, TensorInfo]  # from the header only
    size_bytes: int


def read_adapter_files(path: str | Path, max_file_bytes: int) -> AdapterFiles:
    """Validate the directory layout, parse the config and the safetensors header (not the data)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter directory {path} does not exist (or is not a directory); "
                                   f"pass the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_config(path)
    adapterhub = _is_adapterhub(config)
    weights = path / (ADAPTERHUB_WEIGHTS_FILE if adapterhub else WEIGHTS_FILE)
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if adapterhub and ADAPTERHUB_PICKLE in pickles:
            raise UnsafeAdapterFormatError(
                f"adapter {path} holds AdapterHub weights only as {ADAPTERHUB_PICKLE}, a pickle, which peftserve never "
                f"loads. Convert it once, offline: `peftserve adapters convert {path}` writes {ADAPTERHUB_WEIGHTS_FILE} "
                "(it reads the pickle with torch.load(weights_only=True), which runs no code)")
        if adapterhub:
            raise AdapterNotFoundError(f"adapter {path} is in AdapterHub's layout but has no {ADAPTERHUB_WEIGHTS_FILE}; "
                                       "save it with model.save_adapter(dir, name, use_safetensors=True)")
        if pickles:
            raise UnsafeAdapterFormatError(
                f"adapter {path} has weights only in a pickle format ({', '.join(pickles)}), which peftserve "
                f"never loads (unpickling runs arbitrary code). Re-save with safetensors: "
                f"model.save_pretrained(dir, safe_serialization=True) writes {WEIGHTS_FILE}")
        raise AdapterNotFoundError(f"adapter {path} has no {WEIGHTS_FILE}; save the adapter with "
                                   "PeftModel.save_pretrained (safetensors) or adapters.bitfit.save_bitfit")
    size = weights.stat().st_size
    if size > max_file_bytes:
        raise AdapterLimitError(f"adapter {path}: {WEIGHTS_FILE} is {size} bytes, above the configured "
                                f"max_file_bytes={max_file_bytes}; use a smaller rank/fewer targets or raise the limit")
    tensors = read_safetensors_header(weights)
    return AdapterFiles(path=path, config=config, weights=weights, tensors=tensors, size_bytes=size)


def _is_adapterhub(config: dict) -> bool:
    from .adapterhub.config import is_adapterhub_config

    return is_adapterhub_config(config)


def read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterNotFoundError(f"adapter {path} has no {CONFIG_FILE}; an adapter directory holds "
                                   f"{CONFIG_FILE} and {WEIGHTS_FILE} as written by save_pretrained")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLimitError(f"adapter {path}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes; "
                                "that is not an adapter config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptAdapterError(f"adapter {path}: {CONFIG_FILE} is not valid JSON ({e}); "
                                  "re-save the adapter") from None
    if not isinstance(config, dict):
        raise CorruptAdapterError(f"adapter {path}: {CONFIG_FILE} must hold a JSON object, "
                                  f"got {type(config).__name__}")
    return config


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check the header against the file size before trusting any number in it."""
    size = file.stat().st_size
    where = f"adapter weights {file}"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptAdapterError(f"{where} is truncated ({size} bytes): not a safetensors file; re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CorruptAdapterError(
                f"{where} declares a {n}-byte header but the file has {size} bytes (cap {MAX_HEADER_BYTES}): "
                "corrupt, truncated or not a safetensors file; re-save it with safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptAdapterError(f"{where} has a corrupt safetensors header (not JSON); re-save it") from None
    if not isinstance(header, dict):
        raise CorruptAdapterError(f"{where}: safetensors header must be a JSON object; re-save it")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CorruptAdapterError(f"{where}: tensor {name!r} has a malformed header entry; re-save it") from None
        if dtype not in DTYPES:
            raise CorruptAdapterError(f"{where}: tensor {name!r} has dtype {dtype}; adapter weights must be "
                                      f"floating point ({', '.join(DTYPES)})")
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != nbytes:
            raise CorruptAdapterError(f"{where}: tensor {name!r} offsets do not match its shape {shape}; "
                                      "the file is corrupt, re-save it")
        if end > data_len:
            raise CorruptAdapterError(f"{where} is truncated: tensor {name!r} ends at byte {end} of a "
                                      f"{data_len}-byte data section; copy or re-save the file completely")
        spans.append((begin, end))
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, nbytes=nbytes)
    spans.sort()
    if any(b < prev_end for (_, prev_end), (b, _) in zip(spans, spans[1:], strict=False)):
        raise CorruptAdapterError(f"{where}: tensors overlap in the data section; the file is corrupt, re-save it")
    return tensors


def load_tensors(files: AdapterFiles) -> dict[str, torch.Tensor]:
    """Read the data as fp32 host tensors; the header was already validated by read_adapter_files."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = load(files.weights.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptAdapterError(f"adapter weights {files.weights} could not be read ({e}); re-save them") from None
    out = {name: t.to(torch.float32) for name, t in raw.items()}
    # One fused norm per tensor: a NaN/Inf makes the norm non-finite. A finite but huge tensor can overflow
    # the norm too, so only the suspects get the exact check (hundreds of isfinite calls cost ~20 ms).
    names = list(out)
    norms = torch.stack(torch._foreach_norm([out[n] for n in names])) if names else torch.zeros(0)
    for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
        if not torch.isfinite(out[names[i]]).all():
            raise CorruptAdapterError(f"adapter weights {files.weights}: tensor {names[i]!r} holds NaN/Inf values; "
                                      "the training run diverged, use an earlier checkpoint")
    return out
