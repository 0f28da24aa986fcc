"""PostgresCatalog: the catalog in PostgreSQL, for registries shared by many nodes (psycopg + its pool).

Same contract as SQLiteCatalog (serve/registry/catalog.py). Writers serialize on the generation row
(`SELECT ... FOR UPDATE`), so check-then-insert is atomic across nodes: of two nodes registering one
name at once, one commits and the other sees the row and gets 409. Every change stamps its rows with the
new generation (`changed`, indexed) and announces it with NOTIFY on `CHANNEL` (delivered at commit); a
replica LISTENs on a dedicated connection (`feed()`) and reads only what changed since the generation it
has seen (`changes`). A missed notification (reconnect) costs one version check, never a snapshot.

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

from serve.registry.catalog import CatalogEntry, Changes
from serve.registry.errors import AdapterExists, AdapterNotFound, BackendUnavailable
from serve.registry.secrets import redact_url, scrub

SCHEMA_VERSION = 2
CHANNEL = "peftserve_catalog"  # NOTIFY payload: the generation a change committed
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
    2: """
ALTER TABLE peftserve_adapters ADD COLUMN IF NOT EXISTS changed BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS peftserve_adapters_changed ON peftserve_adapters (base, changed);
""",
}
_COLUMNS = "base, base_name, name, version, digest, kind, size_bytes, source, spec, created_at"
_LATEST = f"""
SELECT DISTINCT ON (name) {_COLUMNS}, deleted_at FROM peftserve_adapters
WHERE base = %s {{name}} ORDER BY name, version DESC
"""
_CHANGED = _LATEST.format(name="AND name IN (SELECT name FROM peftserve_adapters WHERE base = %s AND changed > %s)")


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
            raise _unavailable(self.where, e) from None
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

    def changes(self, base: str, since: int) -> Changes:
        with self._conn() as c, c.transaction():
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            gen = int(c.execute("SELECT value FROM peftserve_meta WHERE key='generation'").fetchone()[0])
            rows = c.execute(_CHANGED, (base, base, since)).fetchall()
        return Changes(gen, [_entry(r) for r in rows if r[10] is None], [r[2] for r in rows if r[10] is not None])

    def counts(self, base: str, by: str = "method") -> dict[str, int]:
        """Live adapters of `base` per kind or per PEFT method (spec.method, else the kind), counted here."""
        key = "kind" if by == "kind" else "COALESCE(spec->>'method', kind)"
        with self._conn() as c:
            rows = c.execute(f"SELECT {key}, COUNT(*) FROM ({_LATEST.format(name='')}) t WHERE deleted_at IS NULL "
                             "GROUP BY 1", (base,)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def feed(self) -> ChangeFeed:
        """A dedicated connection LISTENing for changes (one per replica); BackendUnavailable if down."""
        return ChangeFeed(self._url, self.where, self.timeout_s)

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
            gen = _bump(c)
            row = c.execute(f"INSERT INTO peftserve_adapters ({_COLUMNS}, changed) VALUES (%s, %s, %s, %s, %s, %s, "
                            f"%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                            (entry.base, entry.base_name, entry.name, version, entry.digest, entry.kind,
                             entry.size_bytes, entry.source, json.dumps(entry.spec, default=str),
                             time.time(), gen)).fetchone()
        return _entry(row)

    def retire(self, base: str, name: str) -> CatalogEntry:
        with self._conn() as c, c.transaction():
            c.execute("SELECT value FROM peftserve_meta WHERE key = 'generation' FOR UPDATE")
            row = self._latest_live(c, base, name)
            if row is None:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            gen = _bump(c)
            c.execute("UPDATE peftserve_adapters SET deleted_at = %s, changed = %s WHERE base = %s AND name = %s "
                      "AND deleted_at IS NULL", (time.time(), gen, base, name))
        return _entry(row)

    def live_digests(self) -> set[str]:
        with self._conn() as c:
            return {r[0] for r in c.execute("SELECT DISTINCT digest FROM peftserve_adapters WHERE deleted_at IS NULL")}

    def import_rows(self, rows: list[tuple[CatalogEntry, float | None]]) -> int:
        """Copy rows (entry, deleted_at) verbatim, versions kept; rows already present are skipped
        (`peftserve registry migrate` can be re-run). Returns how many were inserted."""
        with self._conn() as c, c.transaction():
            c.execute("SELECT value FROM peftserve_meta WHERE key = 'generation' FOR UPDATE")
            gen = _bump(c)
            with c.cursor() as cur:  # executemany pipelines the rows; rowcount sums the inserted ones
                cur.executemany(f"INSERT INTO peftserve_adapters ({_COLUMNS}, deleted_at, changed) VALUES (%s, %s, "
                                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                [(e.base, e.base_name, e.name, e.version, e.digest, e.kind, e.size_bytes, e.source,
                                  json.dumps(e.spec, default=str), e.created_at, deleted_at, gen)
                                 for e, deleted_at in rows])
                return max(cur.rowcount, 0)


def _bump(c) -> int:
    """The next generation, inside the caller's transaction (which holds the generation row's lock); its
    NOTIFY is delivered to every listener when that transaction commits, never before."""
    gen = int(c.execute("UPDATE peftserve_meta SET value = value + 1 WHERE key = 'generation' RETURNING value")
              .fetchone()[0])
    c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(gen)))
    return gen


class ChangeFeed:
    """One replica's subscription to catalog changes: a dedicated autocommit connection that LISTENs on
    CHANNEL. TCP keepalives make a silently lost database show up as an error within seconds."""

    def __init__(self, url: str, where: str, timeout_s: float):
        import psycopg

        self.where = where
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)), keepalives=1,
                                        keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
            self.conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as e:
            raise _unavailable(where, e) from None

    def wait(self, timeout_s: float) -> int | None:
        """The highest generation announced within `timeout_s` (every notification already queued is
        consumed: a burst of changes is one wake-up), or None if none came."""
        import psycopg

        try:
            gens = [n.payload for n in self.conn.notifies(timeout=timeout_s, stop_after=1)]
            if gens:
                gens += [n.payload for n in self.conn.notifies(timeout=0.0)]
        except psycopg.Error as e:
            raise _unavailable(self.where, e) from None
        return max((int(g) for g in gens if g.isdigit()), default=0) if gens else None

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def _unavailable(where: str, e: BaseException) -> BackendUnavailable:
    text = str(e).strip()
    return BackendUnavailable("catalog", where, scrub(text.splitlines()[0] if text else type(e).__name__))
