"""The adapter catalog: named, versioned entries, each scoped to one base, plus a change counter.

`Catalog` is the interface every backend implements; `SQLiteCatalog` is the embedded default (one file,
safe to share between processes on one node through SQLite's locking).

An entry belongs to one base (its fingerprint): a server lists and serves only its own base's adapters,
and the same name may exist for two bases. Every change bumps `generation` and stamps the rows it wrote
with it (`changed`), so a replica that has seen generation G asks for the names changed since G
(`changes`): one indexed read whose cost grows with the changes, not with the catalog.

Schema versions (`meta.schema_version`): 1 had no base column; 2 adds `base` and `base_name`; 3 adds
`changed`. A v1 file is migrated in place on open: its entries get base '' (registered before scoping),
which no server serves; re-register them against their base. v2 -> v3 adds the column (0 for old rows).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serve.registry.errors import AdapterExists, AdapterNotFound, store_full

SCHEMA_VERSION = 3
UNSCOPED_BASE = ""  # entries migrated from schema 1


@dataclass(frozen=True)
class CatalogEntry:
    base: str  # the base's fingerprint
    base_name: str  # how the base was named when registered (hub id, path, "embedded tiny")
    name: str
    version: int
    digest: str
    kind: str
    size_bytes: int
    source: str
    spec: dict
    created_at: float


@dataclass(frozen=True)
class Changes:
    """What changed for one base after a generation: the latest live entry of each changed name, and the
    names whose latest version is deleted."""

    generation: int
    upserts: list[CatalogEntry]
    removed: list[str]


class Catalog(Protocol):
    def generation(self) -> int: ...

    def changes(self, base: str, since: int) -> Changes:
        """(current generation, entries of `base` changed after generation `since`), read consistently."""

    def active(self, base: str) -> tuple[int, list[CatalogEntry]]:
        """(generation, the latest live version of every name of `base`), read consistently."""

    def get(self, base: str, name: str) -> CatalogEntry | None: ...

    def bases_of(self, name: str) -> list[tuple[str, str]]:
        """(fingerprint, base name) of every base where `name` is live."""

    def publish(self, entry: CatalogEntry, replace: bool) -> CatalogEntry:
        """Insert `entry` as the next version of (base, name); AdapterExists unless `replace`."""

    def retire(self, base: str, name: str) -> CatalogEntry:
        """Mark every version of (base, name) deleted; AdapterNotFound if none is live."""

    def live_digests(self) -> set[str]: ...


_COLUMNS = "base, base_name, name, version, digest, kind, size_bytes, source, spec, created_at"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS adapters (
    base TEXT NOT NULL, base_name TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    digest TEXT NOT NULL, kind TEXT NOT NULL, size_bytes INTEGER NOT NULL, source TEXT NOT NULL,
    spec TEXT NOT NULL, created_at REAL NOT NULL, deleted_at REAL, changed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (base, name, version));
CREATE INDEX IF NOT EXISTS adapters_changed ON adapters (base, changed);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION});
"""
_MIGRATE_V1 = f"""
ALTER TABLE adapters RENAME TO adapters_v1;
{_SCHEMA}
INSERT INTO adapters SELECT '{UNSCOPED_BASE}', '(registered before per-base scoping)', name, version, digest,
    kind, size_bytes, source, spec, created_at, deleted_at, 0 FROM adapters_v1;
DROP TABLE adapters_v1;
UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';
"""
_MIGRATE_V2 = f"""
ALTER TABLE adapters ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS adapters_changed ON adapters (base, changed);
UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';
"""
_LATEST = f"""
SELECT {_COLUMNS} FROM adapters a
WHERE a.deleted_at IS NULL AND a.base = ? AND a.version =
    (SELECT MAX(version) FROM adapters b WHERE b.base = a.base AND b.name = a.name)
"""
# the latest version (live or deleted) of every name of a base with a row changed after a generation
_CHANGED = f"""
SELECT {_COLUMNS}, deleted_at FROM adapters a
WHERE a.base = ? AND a.name IN (SELECT name FROM adapters WHERE base = ? AND changed > ?) AND a.version =
    (SELECT MAX(version) FROM adapters b WHERE b.base = a.base AND b.name = a.name)
"""


def _entry(row: sqlite3.Row) -> CatalogEntry:
    return CatalogEntry(base=row["base"], base_name=row["base_name"], name=row["name"], version=row["version"],
                        digest=row["digest"], kind=row["kind"], size_bytes=row["size_bytes"],
                        source=row["source"], spec=json.loads(row["spec"]), created_at=row["created_at"])


class SQLiteCatalog:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.where = f"SQLite {self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._open_schema()

    def _open_schema(self) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see version 2
        try:
            cols = {r["name"] for r in db.execute("PRAGMA table_info(adapters)")}
            if cols and "base" not in cols:
                script = _MIGRATE_V1
            elif cols and "changed" not in cols:
                script = _MIGRATE_V2
            else:
                script = _SCHEMA
            for stmt in filter(str.strip, script.split(";")):
                db.execute(stmt)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
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
                raise store_full("catalog", e) from None
            raise

    def generation(self) -> int:
        return int(self._db().execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def schema_version(self) -> int:
        return int(self._db().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    def active(self, base: str) -> tuple[int, list[CatalogEntry]]:
        db = self._db()
        db.execute("BEGIN")
        try:
            gen = int(db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            rows = db.execute(_LATEST + " ORDER BY a.name", (base,)).fetchall()
        finally:
            db.execute("COMMIT")
        return gen, [_entry(r) for r in rows]

    def changes(self, base: str, since: int) -> Changes:
        db = self._db()
        db.execute("BEGIN")
        try:
            gen = int(db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            rows = db.execute(_CHANGED, (base, base, since)).fetchall()
        finally:
            db.execute("COMMIT")
        return Changes(gen, [_entry(r) for r in rows if r["deleted_at"] is None],
                       [r["name"] for r in rows if r["deleted_at"] is not None])

    def get(self, base: str, name: str) -> CatalogEntry | None:
        row = self._db().execute(_LATEST + " AND a.name = ?", (base, name)).fetchone()
        return None if row is None else _entry(row)

    def bases_of(self, name: str) -> list[tuple[str, str]]:
        rows = self._db().execute("SELECT DISTINCT base, base_name FROM adapters WHERE name = ? AND "
                                  "deleted_at IS NULL ORDER BY base", (name,)).fetchall()
        return [(r["base"], r["base_name"]) for r in rows]

    def publish(self, entry: CatalogEntry, replace: bool) -> CatalogEntry:
        with self._tx() as db:
            if not replace:
                row = db.execute(_LATEST + " AND a.name = ?", (entry.base, entry.name)).fetchone()
                if row is not None:
                    raise AdapterExists.for_version(entry.name, row["version"])
            version = 1 + db.execute("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE base = ? AND name = ?",
                                     (entry.base, entry.name)).fetchone()[0]
            gen = _bump(db)
            db.execute(f"INSERT INTO adapters ({_COLUMNS}, deleted_at, changed) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                       (entry.base, entry.base_name, entry.name, version, entry.digest, entry.kind,
                        entry.size_bytes, entry.source, json.dumps(entry.spec, default=str), time.time(), gen))
            # read back inside the transaction: a concurrent register/delete may follow right after the commit
            row = db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE base = ? AND name = ? AND version = ?",
                             (entry.base, entry.name, version)).fetchone()
        return _entry(row)

    def retire(self, base: str, name: str) -> CatalogEntry:
        with self._tx() as db:
            row = db.execute(_LATEST + " AND a.name = ?", (base, name)).fetchone()
            if row is None:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            gen = _bump(db)
            db.execute("UPDATE adapters SET deleted_at = ?, changed = ? WHERE base = ? AND name = ? AND "
                       "deleted_at IS NULL", (time.time(), gen, base, name))
        return _entry(row)

    def live_digests(self) -> set[str]:
        return {r["digest"] for r in self._db().execute("SELECT digest FROM adapters WHERE deleted_at IS NULL")}

    def rows(self) -> list[tuple[CatalogEntry, float | None]]:
        """Every version of every entry with its deletion time (what `peftserve registry migrate` copies)."""
        rows = self._db().execute(f"SELECT {_COLUMNS}, deleted_at FROM adapters ORDER BY base, name, version")
        return [(_entry(r), r["deleted_at"]) for r in rows]

    def import_rows(self, rows: list[tuple[CatalogEntry, float | None]]) -> int:
        """Insert rows (entry, deleted_at) verbatim in one transaction; present ones are skipped."""
        with self._tx() as db:
            gen = _bump(db)
            before = db.total_changes
            db.executemany(f"INSERT OR IGNORE INTO adapters ({_COLUMNS}, deleted_at, changed) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(e.base, e.base_name, e.name, e.version, e.digest, e.kind, e.size_bytes, e.source,
                             json.dumps(e.spec, default=str), e.created_at, d, gen) for e, d in rows])
            n = db.total_changes - before
        return n

    def counts(self, base: str, by: str = "method") -> dict[str, int]:
        """Live adapters of `base` per kind, or per PEFT method (spec.method, else the kind): /info and
        /metrics without a snapshot."""
        key = "kind" if by == "kind" else "COALESCE(json_extract(spec, '$.method'), kind)"
        rows = self._db().execute(f"SELECT {key} AS k, COUNT(*) AS n FROM ({_LATEST}) GROUP BY k", (base,)).fetchall()
        return {r["k"]: r["n"] for r in rows}


def _bump(db: sqlite3.Connection) -> int:
    """The next generation (inside the caller's write transaction): stamps the rows it writes."""
    db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
