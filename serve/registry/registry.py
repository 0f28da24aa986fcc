"""AdapterRegistry: a catalog plus a content-addressed store, shared by every replica, scoped per base.

Default layout under `root` (`$PEFTSERVE_HOME/registry`): `catalog.sqlite` (serve/registry/catalog.py) and
`store/` (serve/registry/store.py).

A registration copies (or receives) the files into staging, fsyncs them, validates the staged bytes (the
bytes that will be served, not the source, so nothing can change between check and use), publishes the
object under its digest and only then commits the catalog entry.

The registry is opened unbound (`AdapterRegistry(root)`: generation, staging and gc work) and bound to one
base with `for_base(fingerprint, name)`: listing, lookups, registration and deletion see that base only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.registry.catalog import Catalog, CatalogEntry, SQLiteCatalog
from serve.registry.errors import (
    AdapterExists,
    AdapterNotFound,
    AdapterRejected,
    BackendUnavailable,
    RegistryError,
)
from serve.registry.files import (
    CONFIG_FILE,
    WEIGHT_SUFFIX,
    adapter_files,
    check_name,
    copy_file,
    directory_digest,
    fsync_dir,
)
from serve.registry.store import LocalStore, Store


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    version: int
    digest: str
    kind: str
    size_bytes: int
    source: str
    created_at: float
    spec: dict
    base: str  # fingerprint of the base it was validated against
    base_name: str
    path: str  # the store object directory the engine loads from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    adapters: dict[str, AdapterRecord]


@dataclass(frozen=True)
class Delta:
    """This base's changes after a generation: the latest record of each changed name, and removed names."""

    generation: int
    upserts: dict[str, AdapterRecord]
    removed: list[str]


class AdapterRegistry:
    """Durable catalog of named, versioned adapters per base. Safe to share between processes."""

    def __init__(self, root: str | Path, max_adapter_bytes: int = 512 << 20, *,
                 catalog: Catalog | None = None, store: Store | None = None):
        self.root = Path(root).expanduser()
        self.max_adapter_bytes = max_adapter_bytes
        self.catalog = catalog if catalog is not None else SQLiteCatalog(self.root / "catalog.sqlite")
        self.store = store if store is not None else LocalStore(self.root / "store")
        self.base: str | None = None
        self.base_name: str | None = None
        # last entry seen per (base, name): lookups answer from it while the catalog is unreachable, so
        # adapters this node already serves keep serving through a database outage
        self._seen: dict[tuple[str, str], CatalogEntry] = {}

    def for_base(self, fingerprint: str, name: str | None = None) -> AdapterRegistry:
        """A view of this registry bound to one base (shares the catalog and store connections)."""
        bound = copy.copy(self)
        bound.base, bound.base_name = fingerprint, name or fingerprint
        return bound

    def _scope(self) -> str:
        if self.base is None:
            raise RuntimeError("this AdapterRegistry is not bound to a base; use registry.for_base(fingerprint)")
        return self.base

    # ---- paths of the local store (tests and operators look inside) -------------------------------
    @property
    def objects(self) -> Path:
        return self.store.objects

    @property
    def tmp(self) -> Path:
        return self.store.tmp

    # ---- reads -----------------------------------------------------------------------------------
    def generation(self) -> int:
        """Bumped by every change of any base; replicas compare it on each request (one indexed read)."""
        return self.catalog.generation()

    def list(self) -> list[AdapterRecord]:
        return list(self.snapshot().adapters.values())

    def get(self, name: str) -> AdapterRecord:
        check_name(name)
        key = (self._scope(), name)
        try:
            entry = self.catalog.get(*key)
        except BackendUnavailable:
            if key not in self._seen:
                raise
            return self._record(self._seen[key])
        if entry is None:
            self._seen.pop(key, None)
            raise AdapterNotFound(self.not_here(name))
        self._seen[key] = entry
        return self._record(entry)

    def not_here(self, name: str) -> str:
        """Why `name` is not served here, naming the base(s) it is registered for, if any."""
        others = [(fp, label) for fp, label in self.catalog.bases_of(name) if fp != self.base]
        if not others:
            return f"adapter {name!r} is not registered (GET /adapters lists the registered ones)"
        where = "; ".join(f"{label} ({fp[:19]})" if label != fp else fp for fp, label in others)
        return (f"adapter {name!r} is registered for another base ({where}), not for this server's base "
                f"{self.base_name} ({(self.base or '')[:19]}); register it against this base or send the "
                "request to a server on that base")

    def snapshot(self) -> Snapshot:
        """Generation and this base's live adapters, read in one transaction, so they agree."""
        gen, entries = self.catalog.active(self._scope())
        for key in [k for k in self._seen if k[0] == self.base]:
            del self._seen[key]
        self._seen.update({(self.base, e.name): e for e in entries})
        return Snapshot(gen, {e.name: self._record(e) for e in entries})

    def changes(self, since: int) -> Delta:
        """What changed for this base after generation `since` (one indexed read: its cost grows with the
        changes, not with the catalog)."""
        ch = self.catalog.changes(self._scope(), since)
        for e in ch.upserts:  # refresh what this process looked up; a bulk import is not cached here
            if (self.base, e.name) in self._seen:
                self._seen[(self.base, e.name)] = e
        for name in ch.removed:
            self._seen.pop((self.base, name), None)
        return Delta(ch.generation, {e.name: self._record(e) for e in ch.upserts}, ch.removed)

    def counts(self, by: str = "method") -> dict[str, int]:
        """Live adapters of this base per PEFT method (or `by="kind"`), counted by the catalog (no snapshot)."""
        return self.catalog.counts(self._scope(), by)

    def feed(self):
        """A subscription to catalog changes (`wait(timeout_s)` -> generation | None, `close()`), or None when
        the catalog cannot announce changes (SQLite: replicas check the generation instead)."""
        open_feed = getattr(self.catalog, "feed", None)
        return open_feed() if open_feed is not None else None

    def _record(self, e: CatalogEntry) -> AdapterRecord:
        return AdapterRecord(name=e.name, version=e.version, digest=e.digest, kind=e.kind,
                             size_bytes=e.size_bytes, source=e.source, created_at=e.created_at, spec=e.spec,
                             base=e.base, base_name=e.base_name, path=str(self.store.local_path(e.digest)))

    def fetch(self, record: AdapterRecord, pinned: set[str] = frozenset()) -> str:
        """Make `record`'s files readable on this node (remote stores download into the node cache once per
        node; objects in `pinned` are never evicted for it); returns the path the engine loads from."""
        return str(self.store.fetch(record.digest, pinned))

    def check(self) -> None:
        """Raise BackendUnavailable naming the catalog or the store if either cannot be reached now."""
        self.catalog.generation()
        self.store.probe()

    def backends(self) -> dict[str, str]:
        """Which catalog and store this registry uses, credentials redacted (for /info and logs)."""
        return {"catalog": self.catalog.where, "store": self.store.where}

    # ---- writes ----------------------------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory on the store's filesystem (publishing from it is atomic); removed after."""
        with self.store.staging() as path:
            yield path

    def register(self, name: str, source: str | Path, validate: Callable[[Path], object],
                 replace: bool = False, source_label: str | None = None) -> AdapterRecord:
        """Copy an adapter directory into the store and catalog it. Raises a RegistryError subclass."""
        check_name(name)
        self._refuse_existing(name, replace)  # fail fast; re-checked under the catalog's write lock
        src = Path(source).expanduser()
        label = source_label or str(source)
        with self.staging() as staged:
            total = 0
            for f in adapter_files(src, label):
                total += copy_file(f, staged / f.name, self.max_adapter_bytes - total)
            return self.register_staged(name, staged, validate, replace, label)

    def register_staged(self, name: str, staged: Path, validate: Callable[[Path], object],
                        replace: bool = False, source_label: str = "upload") -> AdapterRecord:
        """Catalog an adapter whose files are already in a `staging()` directory (uploads, hub downloads).

        Errors name `source_label` (what the user sent), never the staging directory."""
        check_name(name)
        base = self._scope()
        adapter_files(staged, source_label)  # only config + safetensors may be present
        extra = [p.name for p in staged.iterdir() if p.name != CONFIG_FILE and not p.name.endswith(WEIGHT_SUFFIX)]
        if extra:
            raise AdapterRejected(f"adapter source {source_label}: unexpected files {extra}: an adapter is "
                                  f"{CONFIG_FILE} plus *{WEIGHT_SUFFIX}")
        fsync_dir(staged)
        try:
            spec = validate(staged)
        except RegistryError as e:
            raise type(e)(_relabel(str(e), staged, source_label)) from None
        spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        spec_dict.pop("path", None)  # the staging path is meaningless later; records carry the store path
        spec_dict["name"] = name
        digest = directory_digest(staged)
        size_bytes = sum(p.stat().st_size for p in staged.iterdir())
        self.store.put(staged, digest)  # every file stored and verified before the row can appear
        entry = CatalogEntry(base=base, base_name=self.base_name or base, name=name, version=0, digest=digest,
                             kind=str(spec_dict.get("kind", "unknown")),
                             size_bytes=size_bytes,
                             source=source_label, spec=spec_dict, created_at=0.0)
        return self._record(self.catalog.publish(entry, replace))

    def delete(self, name: str) -> AdapterRecord:
        """Retire every version of `name`; store objects stay (in-flight requests may still read them)."""
        check_name(name)
        try:
            return self._record(self.catalog.retire(self._scope(), name))
        except AdapterNotFound:
            raise AdapterNotFound(self.not_here(name)) from None

    def gc(self, min_age_s: float = 3600.0) -> list[str]:
        """Remove store objects no live catalog entry references and stale staging dirs older than `min_age_s`."""
        return self.store.collect(self.catalog.live_digests(), min_age_s)

    def _refuse_existing(self, name: str, replace: bool) -> None:
        if replace:
            return
        entry = self.catalog.get(self._scope(), name)
        if entry is not None:
            raise AdapterExists.for_version(name, entry.version)


def _relabel(message: str, staged: Path, label: str) -> str:
    """Validators see the staged copy; the user sent `label`. Say what they sent."""
    return message.replace(str(staged), label)
