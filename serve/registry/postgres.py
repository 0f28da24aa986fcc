"""PostgresCatalog: the catalog in PostgreSQL, for registries shared by many nodes (psycopg + its pool).

Same contract as SQLiteCatalog (serve/registry/catalog.py). Writers serialize on the generation row
(`SELECT ... FOR UPDATE`), so check-then-insert is atomic across nodes: of two nodes registering one
name at once, one commits and the other sees the row and gets 409. Nodes notice changes by polling
`generation()` (one primary-key read) before requests.

Schema: created on first use under an advisory lock (nodes may start together) and versioned in
`peftserve_meta.schema_version`; `_MIGRATIONS[n]` takes a database from version n-1 to n.

An unreachable database raises BackendUnavailable (503) naming the redacted URL; after a failure the
catalog fails fast for `RETRY_AFTER_S` instead of making every request wait for a connect timeout.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from serve.registry.catalog import CatalogEntry
from serve.registry.errors import AdapterExists, AdapterNotFound, BackendUnavailable
from serve.registry.secrets import redact_url, scrub

SCHEMA_VERSION = 1
SCHEMA_LOCK = 0x70656674  # pg_advisory_xact_lock key: one node creates or migrates the schema
RETRY_AFTER_S = 1.0
_MIGRATIONS = {
    1: """
CREATE TABLE IF NOT EXISTS peftserve_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS peftserve_adapters (
    base TEXT NOT NULL, base_name TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    digest TEXT NOT NULL, kind TEXT NOT NULL, size_bytes BIGINT NOT NULL, source TEXT NOT NULL,
    spec JSONB NOT NULL, created_at DOUBLE PRECISION NOT NULL, deleted_at DOUBLE PRECISION,
    PRIMARY KEY (base, name, version));
CREATE INDEX IF NOT EXISTS peftserve_adapters_live ON peftserve_adapters (base, name) WHERE deleted_at IS NULL;
INSERT INTO peftserve_meta (key, value) VALUES ('generation', 0) ON CONFLICT DO NOTHING;
""",
}
_COLUMNS = "base, base_name, name, version, digest, kind, size_bytes, source, spec, created_at"
_LATEST = f"""
SELECT DISTINCT ON (name) {_COLUMNS}, deleted_at FROM peftserve_adapters
WHERE base = %s {{name}} ORDER BY name, version DESC
"""


def _entry(r: tuple) -> CatalogEntry:
    spec = r[8] if isinstance(r[8], dict) else json.loads(r[8])
    return CatalogEntry(base=r[0], base_name=r[1], name=r[2], version=r[3], digest=r[4], kind=r[5],
                        size_bytes=r[6], source=r[7], spec=spec, created_at=r[9])


class PostgresCatalog:
    def __init__(self, url: str, min_size: int = 1, max_size: int = 4, timeout_s: float = 1.0):
        self.where = f"PostgreSQL {redact_url(url)}"
        self.timeout_s = timeout_s
        self._url, self._sizes = url, (min_size, max_size)
        self._schema_ready = False
        self._down_until = 0.0
        self._broken = False
        self._lock = threading.Lock()
        self._pool = self._open_pool()

    def _open_pool(self):
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(self._url, min_size=self._sizes[0], max_size=self._sizes[1], open=False,
                              timeout=self.timeout_s, check=ConnectionPool.check_connection,
                              name="peftserve-catalog", kwargs={"connect_timeout": max(1, int(self.timeout_s))})
        pool.open(wait=False)  # a database that is down at start is a degraded start, not a crash
        return pool

    def _reopen_if_broken(self) -> None:
        """After an outage, a fresh pool: the old one's reconnect backoff grows to many seconds, a fresh
        pool connects at once, so a database that is back is used again within RETRY_AFTER_S."""
        with self._lock:
            if self._broken:
                old, self._pool, self._broken = self._pool, self._open_pool(), False
                old.close(timeout=0)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _conn(self) -> Iterator:
        import psycopg
        import psycopg_pool

        if time.monotonic() < self._down_until:
            raise BackendUnavailable("catalog", self.where, "it failed moments ago")
        self._reopen_if_broken()
        try:
            with self._pool.connection(timeout=self.timeout_s) as conn:
                if not self._schema_ready:
                    self._ensure_schema(conn)
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as e:
            self._down_until, self._broken = time.monotonic() + RETRY_AFTER_S, True
            raise BackendUnavailable("catalog", self.where, scrub(str(e).strip().splitlines()[0]
                                                                  if str(e).strip() else type(e).__name__)) from None
        self._down_until = 0.0

    def _ensure_schema(self, conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS peftserve_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)")
            row = conn.execute("SELECT value FROM peftserve_meta WHERE key = 'schema_version'").fetchone()
            current = row[0] if row else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"the catalog schema is version {current}, newer than this peftserve "
                                   f"({SCHEMA_VERSION}); upgrade peftserve")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                conn.execute(_MIGRATIONS[version])
            conn.execute("INSERT INTO peftserve_meta (key, value) VALUES ('schema_version', %s) ON CONFLICT (key) "
                         "DO UPDATE SET value = EXCLUDED.value", (SCHEMA_VERSION,))
        self._schema_ready = True

    def schema_version(self) -> int:
        with self._conn() as c:
            return int(c.execute("SELECT value FROM peftserve_meta WHERE key='schema_version'").fetchone()[0])

    def generation(self) -> int:
        with self._conn() as c:
            return int(c.execute("SELECT value FROM peftserve_meta WHERE key='generation'").fetchone()[0])

    def active(self, base: str) -> tuple[int, list[CatalogEntry]]:
        with self._conn() as c, c.transaction():
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # generation and rows agree
            gen = int(c.execute("SELECT value FROM peftserve_meta WHERE key='generation'").fetchone()[0])
            rows = c.execute(_LATEST.format(name=""), (base,)).fetchall()
        return gen, [_entry(r) for r in rows if r[10] is None]

    def get(self, base: str, name: str) -> CatalogEntry | None:
        with self._conn() as c:
            row = c.execute(_LATEST.format(name="AND name = %s"), (base, name)).fetchone()
        return None if row is None or row[10] is not None else _entry(row)

    def bases_of(self, name: str) -> list[tuple[str, str]]:
        with self._conn() as c:
            rows = c.execute("SELECT DISTINCT base, base_name FROM peftserve_adapters WHERE name = %s AND "
                             "deleted_at IS NULL ORDER BY base", (name,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def _latest_live(self, c, base: str, name: str):
        row = c.execute(_LATEST.format(name="AND name = %s"), (base, name)).fetchone()
        return None if row is None or row[10] is not None else row

    def publish(self, entry: CatalogEntry, replace: bool) -> CatalogEntry:
        with self._conn() as c, c.transaction():
            c.execute("SELECT value FROM peftserve_meta WHERE key = 'generation' FOR UPDATE")  # one writer
            live = self._latest_live(c, entry.base, entry.name)
            if live is not None and not replace:
                raise AdapterExists.for_version(entry.name, live[3])
            version = 1 + c.execute("SELECT COALESCE(MAX(version), 0) FROM peftserve_adapters WHERE base = %s "
                                    "AND name = %s", (entry.base, entry.name)).fetchone()[0]
            row = c.execute(f"INSERT INTO peftserve_adapters ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                            f"%s, %s) RETURNING {_COLUMNS}",
                            (entry.base, entry.base_name, entry.name, version, entry.digest, entry.kind,
                             entry.size_bytes, entry.source, json.dumps(entry.spec, default=str),
                             time.time())).fetchone()
            c.execute("UPDATE peftserve_meta SET value = value + 1 WHERE key = 'generation'")
        return _entry(row)

    def retire(self, base: str, name: str) -> CatalogEntry:
        with self._conn() as c, c.transaction():
            c.execute("SELECT value FROM peftserve_meta WHERE key = 'generation' FOR UPDATE")
            row = self._latest_live(c, base, name)
            if row is None:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            c.execute("UPDATE peftserve_adapters SET deleted_at = %s WHERE base = %s AND name = %s AND "
                      "deleted_at IS NULL", (time.time(), base, name))
            c.execute("UPDATE peftserve_meta SET value = value + 1 WHERE key = 'generation'")
        return _entry(row)

    def live_digests(self) -> set[str]:
        with self._conn() as c:
            return {r[0] for r in c.execute("SELECT DISTINCT digest FROM peftserve_adapters WHERE deleted_at IS NULL")}

    def import_rows(self, rows: list[tuple[CatalogEntry, float | None]]) -> int:
        """Copy rows (entry, deleted_at) verbatim, versions kept; rows already present are skipped
        (`peftserve registry migrate` can be re-run). Returns how many were inserted."""
        with self._conn() as c, c.transaction():
            c.execute("SELECT value FROM peftserve_meta WHERE key = 'generation' FOR UPDATE")
            n = 0
            for e, deleted_at in rows:
                cur = c.execute(f"INSERT INTO peftserve_adapters ({_COLUMNS}, deleted_at) VALUES (%s, %s, %s, %s, "
                                "%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                (e.base, e.base_name, e.name, e.version, e.digest, e.kind, e.size_bytes, e.source,
                                 json.dumps(e.spec, default=str), e.created_at, deleted_at))
                n += cur.rowcount
            c.execute("UPDATE peftserve_meta SET value = value + 1 WHERE key = 'generation'")
        return n
