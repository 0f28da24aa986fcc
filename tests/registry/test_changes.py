"""Incremental catalog reads: `changes(since)` returns what changed after a generation (registrations,
new versions, deletions) on SQLite and PostgreSQL alike; PostgreSQL announces each commit to LISTENing
feeds; old schemas are migrated in place; method counts come from the database."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from serve.registry import BackendUnavailable, open_registry
from serve.registry.catalog import SQLiteCatalog
from tests.serve.test_registry import BASE, make_adapter, validate

OTHER = "sha256:" + "b" * 64


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    reg = open_registry(tmp_path / "reg", 1 << 20, url, None)
    yield reg
    if url:
        reg.catalog.close()


def test_changes_since_a_generation_are_the_delta(registry, tmp_path):
    mine, other = registry.for_base(BASE, "test base"), registry.for_base(OTHER, "other base")
    mine.register("keep", make_adapter(tmp_path / "k"), validate)
    g0 = mine.generation()
    assert mine.changes(g0).upserts == {} and mine.changes(g0).removed == []
    mine.register("new", make_adapter(tmp_path / "n", seed=1.0), validate)
    mine.register("keep", make_adapter(tmp_path / "k2", seed=2.0), validate, replace=True)
    other.register("elsewhere", make_adapter(tmp_path / "e", seed=3.0), validate)  # another base: not in mine's delta
    d = mine.changes(g0)
    assert d.generation == g0 + 3 and sorted(d.upserts) == ["keep", "new"] and d.removed == []
    assert d.upserts["keep"].version == 2 and d.upserts["new"].version == 1
    g1 = d.generation
    mine.delete("new")
    d = mine.changes(g1)
    assert d.upserts == {} and d.removed == ["new"] and d.generation == g1 + 1
    mine.register("new", make_adapter(tmp_path / "n3", seed=4.0), validate)  # deleted, then back: an upsert
    d = mine.changes(g1)
    assert list(d.upserts) == ["new"] and d.upserts["new"].version == 2 and d.removed == []
    assert mine.changes(-1).upserts.keys() == {"keep", "new"}  # from the start: everything live


def test_counts_per_method_without_a_snapshot(registry, tmp_path):
    mine = registry.for_base(BASE)
    for i in range(3):
        mine.register(f"a{i}", make_adapter(tmp_path / f"a{i}", seed=float(i)), validate)
    mine.delete("a0")
    mine.register("a1", make_adapter(tmp_path / "a1b", seed=9.0), validate, replace=True)  # still one adapter
    assert mine.counts() == mine.counts(by="kind") == {"lora": 2}


def test_postgres_feed_announces_each_commit(pg_url, tmp_path):
    reg = open_registry(tmp_path / "reg", 1 << 20, pg_url, None)
    mine = reg.for_base(BASE)
    feed = reg.feed()
    try:
        assert feed.wait(0.2) is None  # nothing yet
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(feed.wait(10)))
        waiter.start()
        t0 = time.monotonic()
        rec = mine.register("announced", make_adapter(tmp_path / "x"), validate)
        waiter.join()
        assert got == [mine.generation()] and time.monotonic() - t0 < 5
        assert list(mine.changes(got[0] - 1).upserts) == [rec.name]
        for i in range(3):  # a burst is one wake-up carrying the newest generation
            mine.register(f"burst{i}", make_adapter(tmp_path / f"b{i}", seed=float(i + 1)), validate)
        assert feed.wait(5) == mine.generation()
        assert feed.wait(0.2) is None
    finally:
        feed.close()
        reg.catalog.close()
    assert open_registry(tmp_path / "sqlite", 1 << 20).feed() is None  # SQLite: no announcements


def test_feed_on_a_stopped_database_is_503_naming_the_catalog(postgres, tmp_path):
    url = postgres.database("feeddown")
    reg = open_registry(tmp_path / "reg", 1 << 20, url, None)
    feed = reg.feed()
    postgres.stop()
    try:
        with pytest.raises(BackendUnavailable, match="adapter catalog"):
            feed.wait(5)
        with pytest.raises(BackendUnavailable, match="adapter catalog"):
            reg.feed()
    finally:
        postgres.start()
        feed.close()
        reg.catalog.close()


def test_sqlite_v2_file_migrates_to_v3_keeping_entries(tmp_path):
    path = tmp_path / "catalog.sqlite"
    reg = open_registry(tmp_path, 1 << 20).for_base(BASE)
    reg.register("old", make_adapter(tmp_path / "o"), validate)
    db = sqlite3.connect(path)  # back to the v2 layout: no `changed` column
    db.executescript("DROP INDEX adapters_changed; ALTER TABLE adapters DROP COLUMN changed; "
                     "UPDATE meta SET value = 2 WHERE key = 'schema_version';")
    db.close()
    cat = SQLiteCatalog(path)
    assert cat.schema_version() == 3
    g = cat.generation()
    assert [e.name for e in cat.active(BASE)[1]] == ["old"] and cat.changes(BASE, g).upserts == []
    assert [e.name for e in cat.changes(BASE, -1).upserts] == ["old"]  # old rows count as changed at 0


def test_postgres_v1_schema_migrates_to_v2_keeping_entries(postgres, tmp_path):
    import psycopg

    from serve.registry.postgres import _MIGRATIONS, SCHEMA_VERSION, PostgresCatalog

    url = postgres.database("v1")
    with psycopg.connect(url, autocommit=True) as c:  # what a peftserve of schema 1 left behind
        c.execute(_MIGRATIONS[1])
        c.execute("INSERT INTO peftserve_meta VALUES ('schema_version', 1)")
        c.execute("INSERT INTO peftserve_adapters VALUES (%s, 'b', 'old', 1, 'd', 'lora', 1, 's', '{}', 0, NULL)",
                  (BASE,))
        c.execute("UPDATE peftserve_meta SET value = 1 WHERE key = 'generation'")
    cat = PostgresCatalog(url)
    try:
        assert cat.schema_version() == SCHEMA_VERSION == 2
        assert [e.name for e in cat.changes(BASE, -1).upserts] == ["old"] and cat.changes(BASE, 1).upserts == []
    finally:
        cat.close()
