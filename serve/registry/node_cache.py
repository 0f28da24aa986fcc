"""NodeCache: this node's local, content-addressed copy of store objects, bounded by bytes, LRU.

    <root>/objects/<sha256>/   verified copies (directory_digest == name), read by the engine
    <root>/tmp/<random>/       downloads in progress; renamed in only once complete and verified

Every replica process of a node shares the directory, so an object is downloaded once per node. Use
is recorded as the directory's mtime. Eviction removes least recently used objects until the cache fits
`max_bytes`, but never an object in `pinned` (adapters this node currently serves: the engine reads their
files when it loads them), so a bound smaller than the live set is exceeded rather than break serving.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from serve.registry.files import directory_digest, fsync_dir, rename_into


class NodeCache:
    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root).expanduser()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.max_bytes = max_bytes
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.objects / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def touch(self, digest: str) -> None:
        try:
            os.utime(self.path(digest))
        except OSError:
            pass

    def fill(self, digest: str, download: Callable[[Path], None], pinned: set[str] = frozenset()) -> Path:
        """The object's local directory, calling `download(into)` on a miss; the copy is verified first."""
        final = self.path(digest)
        if final.is_dir():
            self.touch(digest)
            return final
        work = self.tmp / uuid.uuid4().hex
        work.mkdir()
        try:
            download(work)
            got = directory_digest(work)
            if got != digest:
                raise ValueError(f"object {digest[:12]} downloaded with digest {got[:12]}: the store copy is "
                                 "corrupt; re-register the adapter")
            fsync_dir(work)
            rename_into(work, final)  # another replica of this node may have finished the same download first
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.evict(pinned | {digest})
        return final

    def adopt(self, staged: Path, digest: str) -> None:
        """Keep a just-published staging directory as this node's copy (no download after registering)."""
        rename_into(staged, self.path(digest))  # already cached (same bytes registered before): staged is dropped

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.objects.glob("*/*") if p.is_file())

    def evict(self, pinned: set[str] = frozenset()) -> list[str]:
        entries = []
        for d in self.objects.iterdir():
            if d.is_dir() and not d.name.endswith(".part"):
                size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
                entries.append((d.stat().st_mtime, d.name, size))
        total = sum(e[2] for e in entries)
        removed = []
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if name in pinned:
                continue
            shutil.rmtree(self.objects / name, ignore_errors=True)
            total -= size
            removed.append(name)
        return removed

    def collect(self, min_age_s: float) -> None:
        """Remove downloads a killed process left in tmp/."""
        cutoff = time.time() - min_age_s
        for d in self.tmp.iterdir():
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
