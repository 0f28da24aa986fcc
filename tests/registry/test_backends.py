"""PostgresCatalog and S3Store against real servers (a throwaway PostgreSQL cluster, moto's S3 server):
the same registry contract as SQLite + a local directory, across 'nodes' (separate node caches)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import boto3
import pytest

from loadtests.registry_servers import AWS_SECRET, PG_PASSWORD
from serve.registry import AdapterExists, AdapterNotFound, BackendUnavailable, open_registry
from serve.registry.node_cache import NodeCache
from serve.registry.postgres import PostgresCatalog
from tests.serve.test_registry import BASE, make_adapter, validate

OPENED: list = []


@pytest.fixture(autouse=True)
def _close_pools():
    yield
    while OPENED:  # a pool left to the garbage collector warns from its own worker thread
        OPENED.pop().catalog.close()


def node(root: Path, pg_url: str | None, store_url: str | None, cache_bytes: int = 64 << 20):
    reg = open_registry(root, 1 << 20, pg_url, store_url, cache_bytes)
    if pg_url:
        OPENED.append(reg)
    return reg.for_base(BASE, "test base")


def test_schema_is_created_once_and_versioned(pg_url):
    a, b = PostgresCatalog(pg_url), PostgresCatalog(pg_url)
    c = PostgresCatalog(pg_url)
    from serve.registry.postgres import SCHEMA_VERSION

    assert a.schema_version() == SCHEMA_VERSION and b.generation() == 0  # two opens: one creation, no error

    with a._conn() as conn:
        conn.execute("UPDATE peftserve_meta SET value = %s WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer than this peftserve"):
        c.generation()
    a.close(), b.close(), c.close()


def test_register_on_one_node_is_served_from_another(pg_url, store_url, tmp_path):
    a, b = node(tmp_path / "a", pg_url, store_url), node(tmp_path / "b", pg_url, store_url)
    rec = a.register("shared", make_adapter(tmp_path / "src", seed=1.0), validate)
    assert (rec.version, rec.kind) == (1, "lora") and b.generation() == a.generation()
    seen = b.get("shared")
    assert seen.digest == rec.digest and not Path(seen.path).exists()  # not on node b until fetched
    path = Path(b.fetch(seen))
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (path / "adapter_model.safetensors").read_bytes() == (tmp_path / "src/adapter_model.safetensors").read_bytes()
    assert Path(a.get("shared").path).is_dir()  # the registering node kept its copy: no download there
    v2 = b.register("shared", make_adapter(tmp_path / "src2", seed=2.0), validate, replace=True)
    assert a.get("shared").version == v2.version == 2
    a.delete("shared")
    with pytest.raises(AdapterNotFound):
        b.get("shared")


def test_concurrent_registration_of_one_name_one_wins(pg_url, store_url, tmp_path):
    nodes = [node(tmp_path / f"n{i}", pg_url, store_url) for i in range(4)]
    srcs = [make_adapter(tmp_path / f"s{i}", seed=float(i)) for i in range(4)]
    outcomes: list[object] = []
    barrier = threading.Barrier(4)

    def go(i):
        barrier.wait()
        try:
            outcomes.append(nodes[i].register("race", srcs[i], validate).version)
        except AdapterExists as e:
            outcomes.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(o for o in outcomes if isinstance(o, int)) == [1]
    assert sum(isinstance(o, AdapterExists) for o in outcomes) == 3
    assert all(AdapterExists.status == 409 for _ in outcomes)


def test_corrupt_store_object_is_never_served(pg_url, store_url, tmp_path):
    a, b = node(tmp_path / "a", pg_url, store_url), node(tmp_path / "b", pg_url, store_url)
    rec = a.register("tampered", make_adapter(tmp_path / "src", seed=3.0), validate)
    bucket, prefix = store_url[5:].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/objects/{rec.digest}/adapter_model.safetensors",
                                  Body=b"not the bytes that were registered")
    with pytest.raises(ValueError, match="corrupt"):
        b.fetch(b.get("tampered"))
    assert not Path(b.get("tampered").path).exists() and not list((tmp_path / "b/node-cache/tmp").iterdir())


def test_node_cache_is_lru_by_bytes_and_keeps_pinned(tmp_path):
    cache = NodeCache(tmp_path / "c", max_bytes=250)

    def writer(n):
        return lambda into: (into / "adapter_model.safetensors").write_bytes(bytes([n]) * 100)

    from serve.registry.files import directory_digest

    digests = []
    for n in range(4):
        d = tmp_path / f"o{n}"
        d.mkdir()
        writer(n)(d)
        digests.append(directory_digest(d))
    import os
    import time

    for i, n in enumerate(range(3)):
        cache.fill(digests[n], writer(n), pinned={digests[0]})
        os.utime(cache.path(digests[n]), (time.time() - 100 + i, time.time() - 100 + i))
    # 3 x 100 B > 250: the oldest unpinned (1) goes; pinned 0 stays though older
    assert [cache.has(d) for d in digests[:3]] == [True, False, True]
    cache.touch(digests[0])
    cache.fill(digests[3], writer(3))  # nothing pinned: least recently used (2) goes
    assert [cache.has(d) for d in digests] == [True, False, False, True] and cache.size_bytes() <= 250
    with pytest.raises(ValueError, match="corrupt"):
        cache.fill(digests[2], writer(9))


def test_outages_are_503s_naming_the_backend_without_credentials(pg_url, moto, tmp_path, monkeypatch):
    dead_pg = f"postgresql://peft:{PG_PASSWORD}@127.0.0.1:1/nodb"  # real credentials, nothing listening
    assert PG_PASSWORD in dead_pg
    reg = node(tmp_path / "r", dead_pg, None)
    with pytest.raises(BackendUnavailable) as e:
        reg.register("x", make_adapter(tmp_path / "src"), validate)
    assert e.value.status == 503 and "catalog (PostgreSQL postgresql://peft:***@127.0.0.1:1/nodb)" in str(e.value)
    assert PG_PASSWORD not in str(e.value) and AWS_SECRET not in str(e.value)
    with pytest.raises(BackendUnavailable, match="catalog"):  # what /health reports as degraded
        reg.check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    store_down = node(tmp_path / "s", pg_url, "s3://nobucket/p")
    with pytest.raises(BackendUnavailable) as e:
        store_down.register("y", make_adapter(tmp_path / "src2"), validate)
    assert "store (S3 s3://nobucket/p/)" in str(e.value) and AWS_SECRET not in str(e.value)
    with pytest.raises(BackendUnavailable, match="store") as e:
        store_down.check()
    assert AWS_SECRET not in str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    assert node(tmp_path / "s", pg_url, None).list() == []  # nothing published


def test_lookups_fall_back_to_what_this_node_saw_while_the_catalog_is_down(pg_url, store_url, tmp_path):
    reg = node(tmp_path / "a", pg_url, store_url)
    reg.register("seen", make_adapter(tmp_path / "src"), validate)
    reg.snapshot()
    reg.catalog._down_until = float("inf")  # the breaker is open: every catalog call fails fast
    assert reg.get("seen").name == "seen"
    with pytest.raises(BackendUnavailable):
        reg.get("never-seen")


def test_gc_removes_unreferenced_and_orphaned_objects(pg_url, store_url, tmp_path):
    reg = node(tmp_path / "a", pg_url, store_url)
    keep = reg.register("keep", make_adapter(tmp_path / "k", seed=1.0), validate)
    gone = reg.register("gone", make_adapter(tmp_path / "g", seed=2.0), validate)
    reg.delete("gone")
    bucket, prefix = store_url[5:].split("/", 1)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/objects/{'f' * 64}/adapter_model.safetensors", Body=b"half")
    assert reg.gc(min_age_s=3600) == []  # young objects stay (a registration may be uploading them)
    removed = reg.gc(min_age_s=-1)
    assert sorted(removed) == sorted([gone.digest, "f" * 64])
    left = {o["Key"].split("/")[-2] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert left == {keep.digest}
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/objects/{keep.digest}/MANIFEST.json")["Body"]
                          .read())
    assert manifest["digest"] == keep.digest and set(manifest["files"]) == {"adapter_config.json",
                                                                            "adapter_model.safetensors"}


def test_store_reads_and_writes_feed_prometheus(pg_url, store_url, tmp_path):
    from serve.app.metrics import Metrics

    a, b = node(tmp_path / "a", pg_url, store_url), node(tmp_path / "b", pg_url, store_url)
    metrics = Metrics()
    metrics.observe_store(a.store), metrics.observe_store(b.store)
    rec = a.register("metered", make_adapter(tmp_path / "src", seed=6.0), validate)
    b.fetch(b.get("metered"))
    b.fetch(b.get("metered"))  # a node-cache hit: no second read

    def sample(name, op):
        return metrics.registry.get_sample_value(name, {"op": op}) or 0.0

    assert sample("peftserve_store_bytes_total", "write") == rec.size_bytes
    assert sample("peftserve_store_bytes_total", "read") == rec.size_bytes
    assert sample("peftserve_store_operation_seconds_count", "read") == 1
    assert sample("peftserve_store_errors_total", "read") == 0
    b.store.s3.delete_object(Bucket=b.store.bucket, Key=b.store._key(rec.digest, "MANIFEST.json"))
    import shutil

    shutil.rmtree(b.store.cache.path(rec.digest))
    from serve.registry.errors import StoreObjectMissing

    with pytest.raises(StoreObjectMissing, match="re-register"):  # deleted behind the registry's back
        b.fetch(b.get("metered"))
    assert sample("peftserve_store_errors_total", "read") == 1


@pytest.mark.parametrize("field, url, needle", [
    ("registry_url", f"mysql://root:{PG_PASSWORD}@db/x", "use postgresql://user:pass@host:5432/db"),
    ("store_url", "gs://bucket/prefix", "use s3://bucket/prefix"),
])
def test_unsupported_backend_urls_fail_before_start_without_the_password(tmp_path, field, url, needle):
    from serve.app.config import AppConfig
    from serve.app.local import free_port
    from serve.app.preflight import preflight
    from serve.engine import ConfigError

    with pytest.raises(ConfigError) as e:
        preflight(AppConfig(registry_dir=str(tmp_path), **{field: url}), "127.0.0.1", free_port())
    assert needle in str(e.value) and PG_PASSWORD not in str(e.value)
