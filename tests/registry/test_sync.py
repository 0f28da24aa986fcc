"""RegistrySync (serve/app/sync.py) over a real Engine and real registries (SQLite; PostgreSQL + LISTEN):
a replica starts holding nothing whatever the catalog's size, registers an adapter when a request first
needs it, follows changes by deltas (new names prefetched, held ones replaced or removed), and keeps
serving what it holds through a catalog outage."""

from __future__ import annotations

import time

import pytest

from serve.app.sync import RegistrySync
from serve.registry import BackendUnavailable, open_registry
from tests.peft_zoo import save_peft

APPLY_S = 3.0  # a change reaches a following replica well within this (notify: ms; poll: 0.5 s)


def until(check, timeout_s: float = APPLY_S) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    from serve.engine import Engine, EngineConfig

    e = Engine.from_config(EngineConfig(base=str(tiny_base_dir), max_batch_rows=4, max_new_tokens_cap=8,
                                        device_slots={"lora": 4, "ia3": 1, "bitfit": 1, "prompt": 1}))
    yield e
    e.close()


@pytest.fixture(scope="module")
def loras(tiny_base, tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("sync-loras")
    return [save_peft(tiny_base.model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, init_lora_weights=False,
                                                  target_modules=["q", "v"]), root / f"l{i}", 40 + i)
            for i in range(3)]


@pytest.fixture
def clean_engine(engine):
    yield engine
    for a in engine.adapters():
        engine.remove_adapter(a["name"])


def bound(root, engine, url=None):
    from serve.app.admin_routes import make_validator

    reg = open_registry(root, 1 << 24, url, None)
    return reg.for_base(engine.base.fingerprint, engine.base.name), make_validator(engine.base_desc, engine.limits)


def test_starts_holding_nothing_and_loads_an_adapter_on_first_use(clean_engine, loras, tmp_path):
    reg, validate = bound(tmp_path, clean_engine)
    for i in range(3):
        reg.register(f"a{i}", loras[i], validate)
    sync = RegistrySync(reg, clean_engine)
    assert sync.held == {} and sync.generation == reg.generation()  # no snapshot at start
    assert not sync.satisfied({"a1": None})
    sync.ensure_current({"a1": 1})
    assert set(sync.held) == {"a1"} and [a["name"] for a in clean_engine.adapters()] == ["a1"]
    sync.ensure_current({"nope": None})  # unknown: left to the engine (UnknownAdapterError, 404)
    assert "nope" not in sync.held


def test_following_thread_prefetches_replaces_and_removes_by_delta(clean_engine, loras, tmp_path):
    reg, validate = bound(tmp_path, clean_engine)
    sync = RegistrySync(reg, clean_engine, poll_s=0.1)
    sync.start()
    try:
        assert until(lambda: sync.mode == "poll") < APPLY_S  # SQLite: no feed, the generation is polled
        reg.register("fresh", loras[0], validate)
        until(lambda: "fresh" in sync.held)  # servable before any request asked for it
        assert sync.satisfied({"fresh": 1}) and not sync.satisfied({"fresh": 2})
        reg.register("fresh", loras[1], validate, replace=True)
        until(lambda: sync.held["fresh"][0] == 2)
        reg.delete("fresh")
        until(lambda: "fresh" not in sync.held)
        assert [a["name"] for a in clean_engine.adapters()] == []
        assert [(c["name"], c["version"]) for c in sync.report()["recent"]] == [("fresh", 1), ("fresh", 2)]
        assert all(0 <= c["lag_s"] < APPLY_S and c["apply_s"] > 0 for c in sync.report()["recent"])
    finally:
        sync.close()


def test_a_bulk_import_stays_lazy_while_held_names_follow(clean_engine, loras, tmp_path):
    reg, validate = bound(tmp_path, clean_engine)
    reg.register("held", loras[0], validate)
    sync = RegistrySync(reg, clean_engine, prefetch_max=2)
    sync.ensure_current({"held": None})
    for i in range(3):  # three new names in one delta: above prefetch_max
        reg.register(f"bulk{i}", loras[i], validate)
    reg.register("held", loras[1], validate, replace=True)
    sync.ensure_current()
    assert sync.held.keys() == {"held"} and sync.held["held"][0] == 2
    sync.ensure_current({"bulk2": None})  # loaded on first use
    assert sync.held.keys() == {"held", "bulk2"}


def test_postgres_listener_applies_a_registration_within_a_second(clean_engine, loras, pg_url, tmp_path):
    reg, validate = bound(tmp_path, clean_engine, pg_url)
    sync = RegistrySync(reg, clean_engine)
    sync.start()
    try:
        until(lambda: sync.mode == "notify")
        t0 = time.monotonic()
        reg.register("told", loras[2], validate)
        until(lambda: "told" in sync.held, 1.0)
        assert time.monotonic() - t0 < 1.0
        report = sync.report()
        assert report["generation"] == reg.generation() and report["degraded"] is None
    finally:
        sync.close()
        reg.catalog.close()


def test_catalog_outage_keeps_held_adapters_and_heals(clean_engine, loras, postgres, tmp_path):
    url = postgres.database("syncdown")
    reg, validate = bound(tmp_path, clean_engine, url)
    reg.register("kept", loras[0], validate)
    reg.register("never-used", loras[1], validate)
    sync = RegistrySync(reg, clean_engine)
    sync.start()
    try:
        until(lambda: sync.mode == "notify")
        sync.ensure_current({"kept": 1})
        postgres.stop()
        try:
            until(lambda: sync.degraded is not None, 15)
            assert sync.satisfied({"kept": 1})  # held: served without touching the catalog
            sync.ensure_current({"kept": 1})
            with pytest.raises(BackendUnavailable, match="adapter catalog"):
                sync.ensure_current({"never-used": None})  # not held here: 503 naming the catalog
        finally:
            postgres.start()
        until(lambda: sync.mode == "notify" and sync.degraded is None, 20)
        reg.register("after", loras[2], validate)
        until(lambda: "after" in sync.held)
    finally:
        sync.close()
        reg.catalog.close()
