"""`peftserve adapters convert`: an AdapterHub `pytorch_adapter.bin` -> the `adapter.safetensors` peftserve reads.

AdapterHub's `save_adapter(dir, name, use_safetensors=True)` fails for prefix tuning (and for unions with a
prefix, and `ln_before=True` bottlenecks) because some modules are reachable under several names: the prefix
pool hangs under every attention layer, `adapter_norm_before` is also `adapter_down.0`. Its state dict then
holds the same tensor under several keys, which torch's pickle stores once and safetensors refuses. Such
adapters exist only as `pytorch_adapter.bin`, which the server never unpickles; this converts them offline.

The pickle is read with `torch.load(weights_only=True)`: only tensors and plain containers are rebuilt, any
other object (a custom class, a function reference) is refused without running code. Each shared tensor is
written once, under its first key in the state dict's order; the later aliases are dropped (the server maps
every alias to the one stored tensor). Pure torch + safetensors; nothing from `serve`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import AdapterNotFoundError, CorruptAdapterError, UnsupportedAdapterError
from ..format import ADAPTERHUB_PICKLE, ADAPTERHUB_WEIGHTS_FILE, CONFIG_FILE, MAX_CONFIG_BYTES


def convert_adapterhub_dir(src: Path, out: Path | None = None) -> Path:
    """Write `adapter.safetensors` for the AdapterHub adapter in `src` (next to its pickle, or into `out`
    together with a copy of adapter_config.json). Returns the path written. Raises AdapterNotFoundError,
    CorruptAdapterError or UnsupportedAdapterError with a message that says what to fix."""
    return _convert(src, out)[0]


def _convert(src: Path, out: Path | None) -> tuple[Path, int]:
    src = Path(src).expanduser()
    if not src.is_dir():
        raise AdapterNotFoundError(f"adapter directory {src} does not exist (or is not a directory); pass the "
                                   f"directory AdapterHub's save_adapter wrote ({CONFIG_FILE}, {ADAPTERHUB_PICKLE})")
    config = src / CONFIG_FILE
    _check_config(src, config)
    pickle_file = src / ADAPTERHUB_PICKLE
    if not pickle_file.is_file():
        hint = (f"it already has {ADAPTERHUB_WEIGHTS_FILE}, which peftserve reads as is"
                if (src / ADAPTERHUB_WEIGHTS_FILE).is_file() else
                "save the adapter with AdapterHub's model.save_adapter(dir, name)")
        raise AdapterNotFoundError(f"adapter {src} has no {ADAPTERHUB_PICKLE} to convert; {hint}")
    tensors = dedup_shared(_load_state_dict(pickle_file))

    target_dir = src if out is None else Path(out).expanduser()
    if target_dir.exists() and not target_dir.is_dir():
        raise AdapterNotFoundError(f"output {target_dir} exists and is not a directory; pass a directory for --out")
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / ADAPTERHUB_WEIGHTS_FILE
    _write_atomic(target, lambda tmp: _save_safetensors(tensors, tmp))
    if target_dir.resolve() != src.resolve():
        _write_atomic(target_dir / CONFIG_FILE, lambda tmp: shutil.copyfile(config, tmp))
    return target, len(tensors)


def _check_config(src: Path, config: Path) -> None:
    """AdapterHub's config must be there (the server needs it next to the weights) and be AdapterHub's."""
    if not config.is_file():
        raise AdapterNotFoundError(f"adapter {src} has no {CONFIG_FILE}; copy the one AdapterHub's save_adapter "
                                   "wrote next to the weights")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise CorruptAdapterError(f"adapter {src}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes; "
                                  "that is not an adapter config")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptAdapterError(f"adapter {src}: {CONFIG_FILE} is not valid JSON ({e}); re-save the adapter "
                                  "with AdapterHub") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        what = "a PEFT config (peft_type)" if isinstance(data, dict) and "peft_type" in data else "not AdapterHub's"
        raise UnsupportedAdapterError(
            f"adapter {src}: {CONFIG_FILE} is {what}: AdapterHub's holds a \"config\" object. Only AdapterHub "
            "adapters are converted; PEFT adapters are saved as safetensors by save_pretrained")


def _load_state_dict(file: Path) -> dict:
    import pickle
    import warnings
    import zipfile

    import torch

    where = f"adapter weights {file}"
    if file.stat().st_size == 0:
        raise CorruptAdapterError(f"{where} is empty; copy it again or re-save the adapter")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; errors below say it all
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler stops at the first object that is not a tensor or plain container (or at
        # bytes that are no pickle at all) before anything in the file is run.
        raise CorruptAdapterError(
            f"{where} was refused by torch's weights-only loader ({_unpickler_reason(e)}): it holds objects "
            "other than tensors or is no torch checkpoint, and nothing in it was run; re-save the adapter with "
            "AdapterHub's save_adapter") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError, TypeError,
            KeyError, IndexError) as e:
        raise CorruptAdapterError(f"{where} is not a readable torch checkpoint ({type(e).__name__}: "
                                  f"{_first_line(e)}); copy it again or re-save the adapter") from None
    if not isinstance(state, dict):
        raise CorruptAdapterError(f"{where} holds a {type(state).__name__}, not a state dict "
                                  "(name -> tensor); re-save the adapter with AdapterHub's save_adapter")
    if not state:
        raise CorruptAdapterError(f"{where} holds no tensors; re-save the adapter with AdapterHub's save_adapter")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CorruptAdapterError(f"{where}: key {key!r} is of type {type(key).__name__}, not a tensor name; "
                                      "the file must be a flat state dict as AdapterHub's save_adapter writes it")
        if not isinstance(value, torch.Tensor):
            raise CorruptAdapterError(f"{where}: {key!r} is of type {type(value).__name__}, not a tensor; the file "
                                      "must be a flat state dict as AdapterHub's save_adapter writes it")
        if not value.is_floating_point() or value.layout != torch.strided or value.is_quantized:
            raise CorruptAdapterError(f"{where}: tensor {key!r} is {value.dtype} ({value.layout}); adapter "
                                      "weights must be dense floating point")
    return state


def dedup_shared(state: dict) -> dict:
    """Keep each shared tensor once, under its first key; drop later keys that are the very same tensor (same
    storage, offset, shape, stride and dtype). A key that only overlaps another's storage as a different view
    is no alias: it keeps its own copy, so no key loses data and safetensors sees no shared memory."""
    kept: dict = {}
    seen: set[tuple] = set()
    storages: set[int] = set()
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:  # empty tensors all sit at address 0 and alias nothing
            continue
        seen.add(ident)
        shared = ptr in storages or not t.numel()
        storages.add(ptr)
        kept[key] = (t.clone() if shared else t).contiguous()
    return kept


def _save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_atomic(target: Path, write) -> None:
    """Write through a temp file in the target's directory and rename it over the target: a reader (or a
    server registering the directory) sees the old file or the whole new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the file unreadable to a server running as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unpickler_reason(e: BaseException) -> str:
    """The specific cause in torch's weights-only error (the global or opcode it stopped at), without the rest
    of the message, which suggests retrying with weights_only=False or allowlisting the global: exactly what
    must not be done with an untrusted file."""
    import re

    found = re.search(r"Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+|Unsupported operand \d+",
                      str(e))
    return found.group(0) if found else "unsupported content"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- CLI: `peftserve adapters ...` -------------------------------------------------------------------------


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="adapters_command", required=True, metavar="{convert}")
    c = sub.add_parser(
        "convert", help=f"write {ADAPTERHUB_WEIGHTS_FILE} for an AdapterHub adapter saved as {ADAPTERHUB_PICKLE}",
        description=f"Read an AdapterHub {ADAPTERHUB_PICKLE} with torch's weights-only loader (no code runs) and "
                    f"write {ADAPTERHUB_WEIGHTS_FILE}, each shared tensor once, which peftserve serves.")
    c.add_argument("dir", type=Path, help=f"the adapter directory ({CONFIG_FILE} + {ADAPTERHUB_PICKLE})")
    c.add_argument("--out", type=Path, default=None,
                   help=f"write into this directory (with a copy of {CONFIG_FILE}) instead of next to the pickle")


def run(args) -> int:
    path, count = _convert(args.dir, args.out)
    print(f"{path} ({count} tensors)")
    return 0
