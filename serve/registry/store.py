"""The adapter store: content-addressed, immutable objects (a directory of adapter files named by digest).

`Store` is the interface every backend implements; `LocalStore` keeps objects in a directory:

    <root>/objects/<sha256>/    adapter_config.json + *.safetensors, never modified once renamed in
    <root>/tmp/<random>/        staging; a crash leaves garbage here, never a half-written object

Writers stage files on the store's own filesystem, so publishing is one atomic rename.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from serve.registry.errors import NO_SPACE, BackendUnavailable, store_full
from serve.registry.files import rename_into


class Store(Protocol):
    def staging(self) -> Iterator[Path]:
        """Context manager: a fresh local directory to assemble an adapter in; removed afterwards."""

    def put(self, staged: Path, digest: str) -> None:
        """Publish a fully written, fsynced staging directory as object `digest` (idempotent)."""

    def local_path(self, digest: str) -> Path:
        """Where this node reads object `digest` from (present only after `fetch` for remote stores)."""

    def fetch(self, digest: str, pinned: set[str] = frozenset()) -> Path:
        """Make object `digest` readable on this node (remote stores: download into the node cache, keeping
        the `pinned` objects); returns `local_path(digest)`."""

    def collect(self, live: set[str], min_age_s: float) -> list[str]:
        """Remove objects not in `live` and staging directories older than `min_age_s`."""

    def probe(self) -> None:
        """Raise BackendUnavailable if the store cannot be reached now (health checks)."""


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.where = f"directory {self.root}"
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        path = self.tmp / uuid.uuid4().hex
        try:
            path.mkdir()
            yield path
        except OSError as e:
            if e.errno in NO_SPACE:
                raise store_full("staging", e.strerror) from None
            raise
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def put(self, staged: Path, digest: str) -> None:
        rename_into(staged, self.objects / digest)  # same content registered before: deduplicated

    def local_path(self, digest: str) -> Path:
        return self.objects / digest

    def fetch(self, digest: str, pinned: set[str] = frozenset()) -> Path:
        return self.objects / digest

    def probe(self) -> None:
        if not self.objects.is_dir():
            raise BackendUnavailable("store", self.where, "its objects directory is gone")

    def collect(self, live: set[str], min_age_s: float) -> list[str]:
        cutoff, removed = time.time() - min_age_s, []
        for d in [*self.objects.iterdir(), *self.tmp.iterdir()]:
            if d.name not in live and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed
