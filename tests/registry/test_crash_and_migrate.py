"""A process killed mid-registration leaves nothing visible, and gc collects its orphans; `peftserve
registry migrate` copies a SQLite + local registry into PostgreSQL and S3 with every digest verified."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import pytest

from serve.cli import main as cli_main
from serve.registry import AdapterNotFound, AdapterRegistry, open_registry
from serve.registry.files import directory_digest
from tests.serve.test_registry import BASE, make_adapter, validate

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from serve.registry import open_registry
    from tests.serve.test_registry import BASE, validate
    root, pg, store, src, marker = sys.argv[1:]
    reg = open_registry(root, 1 << 20, pg, store).for_base(BASE)
    real_put = reg.store.s3.put_object
    def put_then_stall(**kw):  # the first file reaches the bucket, then this process is killed
        real_put(**kw)
        Path(marker).write_text("uploading")
        time.sleep(120)
    reg.store.s3.put_object = put_then_stall
    reg.register("half", src, validate)
""")


def test_killed_during_registration_leaves_nothing_half_visible(pg_url, store_url, tmp_path):
    src, marker = make_adapter(tmp_path / "src", seed=5.0), tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "a"), pg_url, store_url, str(src),
                              str(marker)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.stderr.read() if child.poll() is not None else "child never uploaded"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    other = open_registry(tmp_path / "b", 1 << 20, pg_url, store_url).for_base(BASE)
    with pytest.raises(AdapterNotFound):
        other.get("half")
    assert other.list() == [] and other.generation() == 0
    bucket, prefix = store_url[5:].split("/", 1)
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 1 and not keys[0].endswith("MANIFEST.json")  # an orphan, never a complete object
    assert other.gc(min_age_s=-1) == [keys[0].split("/")[-2]]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    killed_node = open_registry(tmp_path / "a", 1 << 20, pg_url, store_url)
    killed_node.gc(min_age_s=-1)  # the killed process's staging copy goes too
    assert not list((tmp_path / "a/node-cache/tmp").iterdir())
    rec = other.register("half", src, validate)  # the same bytes register cleanly afterwards
    assert rec.version == 1 and Path(other.fetch(rec)).is_dir()
    killed_node.catalog.close(), other.catalog.close()


def _sqlite_registry(tmp_path) -> tuple[AdapterRegistry, dict]:
    reg = AdapterRegistry(tmp_path / "old", max_adapter_bytes=1 << 20).for_base(BASE, "tiny")
    reg.register("keep", make_adapter(tmp_path / "k", seed=1.0), validate)
    reg.register("keep", make_adapter(tmp_path / "k2", seed=2.0), validate, replace=True)
    reg.register("gone", make_adapter(tmp_path / "g", seed=3.0), validate)
    reg.delete("gone")
    return reg, {r.name: r for r in reg.list()}


def test_migrate_sqlite_and_local_store_to_postgres_and_s3(pg_url, store_url, tmp_path, capsys):
    old, live = _sqlite_registry(tmp_path)
    argv = ["registry", "migrate", "--from", str(tmp_path / "old"), "--registry-url", pg_url,
            "--store-url", store_url, "--quiet"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "3 catalog rows (3 new) and 3 objects" in out and "every digest verified" in out
    assert "pg-Secret" not in out and "peft:***@" in out
    new = open_registry(tmp_path / "node", 1 << 20, pg_url, store_url).for_base(BASE, "tiny")
    got = {r.name: r for r in new.list()}
    assert {n: (r.version, r.digest) for n, r in got.items()} == {n: (r.version, r.digest) for n, r in live.items()}
    assert directory_digest(Path(new.fetch(got["keep"]))) == live["keep"].digest
    with pytest.raises(AdapterNotFound):
        new.get("gone")
    assert cli_main(argv) == 0 and "(0 new)" in capsys.readouterr().out  # re-runnable
    new.catalog.close()


def test_migrate_refuses_a_corrupt_object_in_one_line(pg_url, store_url, tmp_path, capsys):
    old, live = _sqlite_registry(tmp_path)
    weights = Path(live["keep"].path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"X")
    rc = cli_main(["registry", "migrate", "--from", str(tmp_path / "old"), "--registry-url", pg_url,
                   "--store-url", store_url, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "does not match its digest" in err[0], err
    after = open_registry(tmp_path / "n", 1 << 20, pg_url, None)
    assert after.for_base(BASE).list() == []  # no rows copied
    after.catalog.close()
