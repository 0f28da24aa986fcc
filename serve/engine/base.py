"""The frozen base model: build the embedded default, load any T5 (hub id or local dir), fingerprint it.

One loading path serves the embedded base, `google/flan-t5-xl`, any hub id and any local T5 directory:
everything goes through `T5ForConditionalGeneration.from_pretrained` and `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

FINGERPRINT_FILE = "peftserve_base.json"
EMBEDDED_NAME = "peftserve/embedded-tiny"

# FLAN-T5 architecture choices in every preset: gated-gelu FFN, untied LM head, no decoder-output
# scaling, 32 relative-attention buckets. Sizes differ only.
PRESETS: dict[str, dict] = {
    # The embedded default: ~2.5M parameters so that CPU tests and demo training take seconds.
    "tiny": dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=4, num_decoder_layers=4, vocab_size=384),
    # Shaped like google/flan-t5-small, for CPU benchmarks.
    "flan-t5-small": dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8,
                          vocab_size=32128),
    # Shaped like google/flan-t5-xl (random weights), for GPU benchmarks.
    "flan-t5-xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24, num_decoder_layers=24,
                       vocab_size=32128),
}


class BaseLoadError(RuntimeError):
    """The base model could not be loaded; the message says what to do instead."""


def default_home() -> Path:
    return Path(os.environ.get("PEFTSERVE_HOME", Path.home() / ".cache" / "peftserve"))


def embedded_base_dir() -> Path:
    return default_home() / "bases" / "embedded-tiny"


def t5_config(preset: str):
    from transformers import T5Config

    if preset not in PRESETS:
        raise ValueError(f"unknown base preset {preset!r}; choose one of {', '.join(PRESETS)}")
    # transformers 5 turns tie_word_embeddings=False into scale_decoder_outputs=False and then forces
    # tie_word_embeddings=True; the head is untied explicitly in build_base.
    return T5Config(
        **PRESETS[preset],
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_base(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a deterministic random-weight T5 with FLAN-T5's architecture plus a ByT5 tokenizer to `out`."""
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    out = Path(out)
    config = t5_config(preset)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # Untie the LM head as FLAN-T5 has it: its own storage, initialised like the embeddings.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * config.d_model**-0.5)
    model.config.tie_word_embeddings = False
    model.eval()
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(tmp)
    (tmp / FINGERPRINT_FILE).write_text(json.dumps(
        {"name": EMBEDDED_NAME if preset == "tiny" else f"peftserve/random-{preset}", "preset": preset,
         "seed": seed, "fingerprint": fingerprint(model), "parameters": sum(p.numel() for p in model.parameters())},
        indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # a half-written base is never visible under `out`
    return out


def ensure_embedded_base(progress: bool = True) -> Path:
    path = embedded_base_dir()
    if not (path / FINGERPRINT_FILE).exists():
        if progress:
            print(f"building the embedded base model at {path} (first run only)", flush=True)
        build_base(path, "tiny")
    return path


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the architecture config and every weight's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    keep = ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers", "vocab_size",
            "feed_forward_proj", "relative_attention_num_buckets")
    cfg = {k: getattr(model.config, k, None) for k in keep}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:  # tied copies hash once
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


@dataclass
class LoadedBase:
    name: str
    model: object  # T5ForConditionalGeneration
    tokenizer: object
    fingerprint: str
    path: str | None


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(source))


def check_local_base(path: Path) -> None:
    """A local base is a T5 directory: config.json with model_type t5, weights and a tokenizer."""
    if not path.exists():
        raise BaseLoadError(f"base path {path} does not exist (expected a T5 model directory, or a hub id "
                            "such as google/flan-t5-xl)")
    if not path.is_dir():
        raise BaseLoadError(f"base path {path} is not a directory (expected a T5 model directory)")
    missing = [f for f in ("config.json",) if not (path / f).exists()]
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("model weights (*.safetensors)")
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer_config.json, tokenizer.json or spiece.model)")
    if missing:
        raise BaseLoadError(f"base path {path} is not a T5 model directory: missing {', '.join(missing)}")
    _check_model_type(path / "config.json", str(path))


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _check_model_type(config_file: Path, label: str) -> None:
    try:
        model_type = json.loads(Path(config_file).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise BaseLoadError(f"base {label}: config.json is not readable JSON ({type(e).__name__}); "
                            "re-save the model with save_pretrained") from None
    if model_type != "t5":
        raise BaseLoadError(f"base {label} holds model_type {model_type!r}; peftserve serves T5 models")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub's host: fails in seconds where the hub client would retry for ~30 s."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


def check_base_source(source: str | None) -> None:
    """Everything about a base that can be known without loading its weights; raises BaseLoadError.

    Local path: directory, config, weights, tokenizer, model type. Hub id: cached locally, or the hub is
    reachable and has the model (only its config.json is fetched). None: the embedded base (always there)."""
    if source is None:
        return
    if _looks_local(source):
        check_local_base(Path(source).expanduser())
        return
    if not _HUB_ID.match(source):
        raise BaseLoadError(f"base {source!r} is neither an existing local directory nor a hub id "
                            "('org/name'); check the path")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        _check_model_type(Path(cached), source)
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise BaseLoadError(f"base {source!r} is not in the local Hugging Face cache and the hub is offline "
                            "(HF_HUB_OFFLINE=1); download it first, pass a local directory, or omit --base "
                            "for the embedded base")
    endpoint = _hub_endpoint()
    if not _reachable(endpoint):
        raise BaseLoadError(f"base {source!r} is not in the local Hugging Face cache and the hub ({endpoint}) "
                            "cannot be reached; download it first, pass a local directory, or omit --base "
                            "for the embedded base")
    try:
        config_file = hf_hub_download(source, "config.json", etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - offline, typo, private repo: all the user's to fix
        raise BaseLoadError(f"could not fetch {source!r} from the Hugging Face hub ({type(e).__name__}): "
                            "offline, or no such model? Use a local T5 directory, or omit --base for the "
                            "embedded base") from None
    _check_model_type(Path(config_file), source)


def load_base(source: str | None = None, dtype: torch.dtype | None = None, device_map=None) -> LoadedBase:
    """Load the base from a hub id or a local directory (None: the embedded default, built if missing).

    `device_map` is passed to from_pretrained (a dict module -> device from serve's planner, or "cpu").
    """
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    if source is None:
        source = str(ensure_embedded_base())
    local = _looks_local(source)
    if local:
        path = Path(source).expanduser()
        check_local_base(path)
        source = str(path)
    kwargs = {"dtype": dtype or torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = T5ForConditionalGeneration.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        if local:
            raise BaseLoadError(f"could not load the T5 model in {source}: {e}") from None
        raise BaseLoadError(
            f"could not fetch {source!r} from the Hugging Face hub (offline, or no such model?). "
            "Use the embedded base (omit --base) or a local T5 directory (--base /path/to/flan-t5)."
        ) from None
    if model.config.model_type != "t5":
        raise BaseLoadError(f"{source} is a {model.config.model_type!r} model; peftserve serves T5 models")
    model.eval()
    model.requires_grad_(False)
    meta_file = Path(source) / FINGERPRINT_FILE if local else None
    if meta_file is not None and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        name, fp = meta["name"], meta["fingerprint"]
    else:
        name, fp = source, fingerprint(model)
    return LoadedBase(name=name, model=model, tokenizer=tokenizer, fingerprint=fp, path=source if local else None)


# ---- CLI: `peftserve base ...` -------------------------------------------------------------------

def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="base_command", required=True, metavar="{build,info}")
    b = sub.add_parser("build", help="write a small deterministic T5 (FLAN-T5 architecture) + ByT5 tokenizer",
                       description="Write a deterministic random-weight T5 with FLAN-T5's architecture and a "
                                   "ByT5 tokenizer, loadable with from_pretrained.")
    b.add_argument("--out", type=Path, default=None, help=f"output directory (default: {embedded_base_dir()})")
    b.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="size: tiny (embedded default, ~2.5M params), flan-t5-small or flan-t5-xl shapes")
    b.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    i = sub.add_parser("info", help="print name, fingerprint and size of a base (hub id or path)",
                       description="Load a base and print its name, fingerprint and parameter count.")
    i.add_argument("source", nargs="?", default=None, help="hub id or local path (default: the embedded base)")


def run(args) -> int:
    if args.base_command == "build":
        out = args.out or embedded_base_dir()
        build_base(out, args.preset, args.seed)
        print(json.loads((out / FINGERPRINT_FILE).read_text())["fingerprint"], out)
        return 0
    base = load_base(args.source)
    print(json.dumps({"name": base.name, "fingerprint": base.fingerprint,
                      "parameters": sum(p.numel() for p in base.model.parameters())}, indent=2))
    return 0
