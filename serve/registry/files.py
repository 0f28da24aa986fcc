"""What makes an adapter on disk (its config and safetensors weights, nothing else), copied and hashed.

Shared by every store backend: a store object is exactly the files `adapter_files` selects, and its
name is `directory_digest` of them.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from serve.registry.errors import AdapterRejected, AdapterTooLarge, InvalidAdapterName

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LEN = 128
# Only these files make an adapter; anything else (pickles, READMEs, checkpoints) is never stored.
CONFIG_FILE = "adapter_config.json"
WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CHUNK = 1 << 20


def check_name(name: str) -> str:
    """A name is one path-free token: letters, digits, `.`, `_`, `-`; 1..128 chars; no `..`."""
    if not isinstance(name, str) or not name:
        raise InvalidAdapterName("adapter name is empty; use 1-128 characters from [A-Za-z0-9._-]")
    if len(name) > MAX_NAME_LEN:
        raise InvalidAdapterName(f"adapter name is {len(name)} characters long; the limit is {MAX_NAME_LEN}")
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter "
            "or digit, no '..', no '/')")
    return name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_into(staged: Path, final: Path) -> None:
    """Publish a finished directory as `final` by one atomic rename; if an equal object is already there
    (content addressing: same name, same bytes) the staged copy is simply left behind for its owner to drop."""
    if final.exists():
        return
    try:
        staged.rename(final)
    except OSError:  # a concurrent writer of the same bytes won the rename
        if not final.exists():
            raise
    fsync_dir(final.parent)


def copy_file(src: Path, dst: Path, limit: int) -> int:
    """Copy with a running byte cap (413 before the whole file is read) and fsync; returns bytes copied."""
    n = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            n += len(chunk)
            if n > limit:
                raise AdapterTooLarge(f"{src.name} is larger than the {limit}-byte limit for adapter files")
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return n


def adapter_files(directory: Path, label: str | None = None) -> list[Path]:
    """The files that make an adapter in `directory`: its config and safetensors weights, nothing else.

    `label` is how errors name the source (what the user sent), when `directory` is an internal copy."""
    where = label or str(directory)
    if not directory.is_dir():
        raise AdapterRejected(f"adapter source {where} is not a directory (expected a PEFT adapter "
                              f"directory with {CONFIG_FILE} and *{WEIGHT_SUFFIX})")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and (p.name == CONFIG_FILE or p.name.endswith(WEIGHT_SUFFIX)))
    links = [p.name for p in files if p.is_symlink()]
    if links:  # a link can point anywhere on the server: only the directory's own files are an adapter
        raise AdapterRejected(f"adapter source {where}: {', '.join(links)} is a symlink; copy the real "
                              "files into the adapter directory")
    pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not any(p.name == CONFIG_FILE for p in files):
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise AdapterRejected(f"adapter source {where} has no {CONFIG_FILE}{hint}")
    if not any(p.name.endswith(WEIGHT_SUFFIX) for p in files):
        hint = f"; found {', '.join(pickles)} but pickled weights are never loaded" if pickles else ""
        if "pytorch_adapter.bin" in pickles:  # AdapterHub's default writer
            hint += f" (convert it once, offline: peftserve adapters convert {where})"
        raise AdapterRejected(f"adapter source {where} has no *{WEIGHT_SUFFIX} weights{hint}")
    return files


def directory_digest(directory: Path) -> str:
    """sha256 over each stored file's name and content: equal adapters share one store object."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                fh.update(chunk)
        h.update(f"{p.name}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()
