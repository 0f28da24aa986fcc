"""The adapter registry: a SQLite catalog plus a content-addressed store, shared by every replica.

Layout under `root` (default `$PEFTSERVE_HOME/registry`):

    catalog.sqlite              adapters(name, version, digest, ...) + meta(generation)
    store/objects/<sha256>/     adapter_config.json + *.safetensors, never modified once renamed in
    store/tmp/<random>/         staging; a crash leaves garbage here, never a half-written object

A registration copies (or receives) the files into staging, fsyncs them, validates the staged bytes (the
bytes that will be served, not the source, so nothing can change between check and use), renames the
directory to its digest and only then commits the catalog row. Every change bumps `generation`, which
replicas compare on each request to decide whether to resync their engine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LEN = 128
# Only these files make an adapter; anything else (pickles, READMEs, checkpoints) is never stored.
CONFIG_FILE = "adapter_config.json"
WEIGHT_SUFFIX = ".safetensors"
_CHUNK = 1 << 20


class RegistryError(Exception):
    """Base of the registry's typed errors; `status` is the HTTP status the API maps it to."""

    status = 400


class InvalidAdapterName(RegistryError):
    status = 400


class AdapterExists(RegistryError):
    status = 409


class AdapterNotFound(RegistryError):
    status = 404


class AdapterRejected(RegistryError):
    """The adapter's files are missing, corrupt, pickled, mismatched with the base, or over a limit."""

    status = 400


class AdapterTooLarge(AdapterRejected):
    status = 413


class StoreFull(RegistryError):
    """The store's filesystem (or the catalog's) has no space left; nothing was registered."""

    status = 507


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _store_full(where: str, detail: object) -> StoreFull:
    return StoreFull(f"the adapter store is full ({where}: {detail}); nothing was registered — free space "
                     "under the registry directory (AdapterRegistry.gc() removes unreferenced objects) and retry")


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
    path: str  # the store object directory the engine loads from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    adapters: dict[str, AdapterRecord]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL, kind TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, source TEXT NOT NULL, spec TEXT NOT NULL, created_at REAL NOT NULL,
    deleted_at REAL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
"""
_ACTIVE = """
SELECT a.* FROM adapters a
JOIN (SELECT name, MAX(version) v FROM adapters GROUP BY name) m ON a.name = m.name AND a.version = m.v
WHERE a.deleted_at IS NULL
"""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path, limit: int) -> int:
    """Copy with a running byte cap (413 before the whole file is read) and fsync; returns bytes copied."""
    n = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            n += len(chunk)
            if n > limit:
                raise AdapterTooLarge(f"{src.name} is larger than the {limit}-byte limit for adapter files")
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return n


def adapter_files(directory: Path) -> list[Path]:
    """The files that make an adapter in `directory`: its config and safetensors weights, nothing else."""
    if not directory.is_dir():
        raise AdapterRejected(f"adapter source {directory} is not a directory (expected a PEFT adapter "
                              f"directory with {CONFIG_FILE} and *{WEIGHT_SUFFIX})")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and (p.name == CONFIG_FILE or p.name.endswith(WEIGHT_SUFFIX)))
    links = [p.name for p in files if p.is_symlink()]
    if links:  # a link can point anywhere on the server: only the directory's own files are an adapter
        raise AdapterRejected(f"adapter source {directory}: {', '.join(links)} is a symlink; copy the real "
                              "files into the adapter directory")
    if not any(p.name == CONFIG_FILE for p in files):
        pickles = [p.name for p in directory.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise AdapterRejected(f"adapter source {directory} has no {CONFIG_FILE}{hint}")
    if not any(p.name.endswith(WEIGHT_SUFFIX) for p in files):
        pickles = [p.name for p in directory.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
        hint = f"; found {', '.join(pickles)} but pickled weights are never loaded" if pickles else ""
        raise AdapterRejected(f"adapter source {directory} has no *{WEIGHT_SUFFIX} weights{hint}")
    return files


def directory_digest(directory: Path) -> str:
    """sha256 over each stored file's name and content: equal adapters share one store object."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                fh.update(chunk)
        h.update(f"{p.name}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


class AdapterRegistry:
    """Durable catalog of named, versioned adapters. Safe to share between processes (SQLite locking)."""

    def __init__(self, root: str | Path, max_adapter_bytes: int = 512 << 20):
        self.root = Path(root).expanduser()
        self.objects = self.root / "store" / "objects"
        self.tmp = self.root / "store" / "tmp"
        self.max_adapter_bytes = max_adapter_bytes
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # idempotent statements; executescript manages its own commit

    # ---- connections -----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "catalog.sqlite", timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # take the write lock up front: check-then-insert is atomic
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
                raise _store_full("catalog", e) from None
            raise

    # ---- reads -----------------------------------------------------------------------------------

    def generation(self) -> int:
        """Bumped by every change; replicas compare it on each request (one indexed read)."""
        return int(self._db().execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def list(self) -> list[AdapterRecord]:
        return [self._record(r) for r in self._db().execute(_ACTIVE + " ORDER BY a.name")]

    def get(self, name: str) -> AdapterRecord:
        check_name(name)
        row = self._db().execute(_ACTIVE + " AND a.name = ?", (name,)).fetchone()
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered (GET /adapters lists the registered ones)")
        return self._record(row)

    def snapshot(self) -> Snapshot:
        """Generation and active adapters read in one transaction, so they agree."""
        db = self._db()
        db.execute("BEGIN")
        try:
            gen = int(db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            rows = db.execute(_ACTIVE).fetchall()
        finally:
            db.execute("COMMIT")
        return Snapshot(gen, {r["name"]: self._record(r) for r in rows})

    def _record(self, row: sqlite3.Row) -> AdapterRecord:
        return AdapterRecord(name=row["name"], version=row["version"], digest=row["digest"], kind=row["kind"],
                             size_bytes=row["size_bytes"], source=row["source"], created_at=row["created_at"],
                             spec=json.loads(row["spec"]), path=str(self.objects / row["digest"]))

    # ---- writes ----------------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory on the store's filesystem (rename into the store is atomic); removed after."""
        path = self.tmp / uuid.uuid4().hex
        try:
            path.mkdir()
            yield path
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise _store_full("staging", e.strerror) from None
            raise
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def register(self, name: str, source: str | Path, validate: Callable[[Path], object],
                 replace: bool = False, source_label: str | None = None) -> AdapterRecord:
        """Copy an adapter directory into the store and catalog it. Raises a RegistryError subclass."""
        check_name(name)
        self._refuse_existing(name, replace)  # fail fast; re-checked under the write lock below
        src = Path(source).expanduser()
        with self.staging() as staged:
            total = 0
            for f in adapter_files(src):
                total += copy_file(f, staged / f.name, self.max_adapter_bytes - total)
            return self.register_staged(name, staged, validate, replace, source_label or str(src))

    def register_staged(self, name: str, staged: Path, validate: Callable[[Path], object],
                        replace: bool = False, source_label: str = "upload") -> AdapterRecord:
        """Catalog an adapter whose files are already in a `staging()` directory (uploads)."""
        check_name(name)
        adapter_files(staged)  # only config + safetensors may be present
        extra = [p.name for p in staged.iterdir() if p.name != CONFIG_FILE and not p.name.endswith(WEIGHT_SUFFIX)]
        if extra:
            raise AdapterRejected(f"unexpected files {extra}: an adapter is {CONFIG_FILE} plus *{WEIGHT_SUFFIX}")
        _fsync_dir(staged)
        spec = validate(staged)
        spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        spec_dict.pop("path", None)  # the staging path is meaningless later; records carry the store path
        spec_dict["name"] = name
        digest = directory_digest(staged)
        size = sum(p.stat().st_size for p in staged.iterdir())
        self._store(staged, digest)
        with self._tx() as db:
            self._refuse_existing(name, replace, db)
            version = 1 + (db.execute("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE name = ?",
                                      (name,)).fetchone()[0])
            db.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                       (name, version, digest, str(spec_dict.get("kind", "unknown")), size, source_label,
                        json.dumps(spec_dict, default=str), time.time()))
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            # read back inside the transaction: a concurrent register/delete may follow right after the commit
            row = db.execute("SELECT * FROM adapters WHERE name = ? AND version = ?", (name, version)).fetchone()
        return self._record(row)

    def delete(self, name: str) -> AdapterRecord:
        """Retire every version of `name`; store objects stay (in-flight requests may still read them)."""
        record = self.get(name)
        with self._tx() as db:
            cur = db.execute("UPDATE adapters SET deleted_at = ? WHERE name = ? AND deleted_at IS NULL",
                             (time.time(), name))
            if cur.rowcount == 0:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        return record

    def gc(self, min_age_s: float = 3600.0) -> list[str]:
        """Remove store objects no catalog row references and stale staging dirs older than `min_age_s`."""
        live = {r["digest"] for r in self._db().execute("SELECT digest FROM adapters WHERE deleted_at IS NULL")}
        cutoff, removed = time.time() - min_age_s, []
        for d in [*self.objects.iterdir(), *self.tmp.iterdir()]:
            if d.name not in live and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    def _refuse_existing(self, name: str, replace: bool, db: sqlite3.Connection | None = None) -> None:
        if replace:
            return
        row = (db or self._db()).execute(_ACTIVE + " AND a.name = ?", (name,)).fetchone()
        if row is not None:
            raise AdapterExists(f"adapter {name!r} already exists (version {row['version']}); "
                                "pass replace=true to register a new version")

    def _store(self, staged: Path, digest: str) -> None:
        """Move the fsynced staging dir to its digest (atomic rename; the staging context's cleanup is a no-op)."""
        final = self.objects / digest
        if final.exists():  # same content registered before: content addressing deduplicates
            return
        try:
            staged.rename(final)
        except OSError:  # a concurrent registration of the same bytes won the rename
            if not final.exists():
                raise
        _fsync_dir(self.objects)
