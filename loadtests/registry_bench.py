"""`peftserve bench --registry`: the multi-node registry, measured on real servers started for the run.

    registration -> first token on the other node   two `peftserve serve` nodes sharing PostgreSQL + S3:
                                                    POST /adapters on A, poll /generate on B (1 token)
    cold load vs local disk                         S3Store fetch into an empty node cache + safetensors
                                                    load, against a LocalStore object (same bytes)
    catalog reads with N registered adapters        get() / generation() / active() on SQLite vs PostgreSQL
    incremental sync (`--only sync`)                one server with 2 engine replicas on PostgreSQL + S3:
                                                    registration -> servable on every replica (each replica's
                                                    own commit -> registered time), with 1,000 then 100,000
                                                    adapters in the catalog (bulk rows), and what one change
                                                    costs: the replica's apply time, the delta query against
                                                    the snapshot re-read it replaces

Writes results.json and registry.png under loadtests/results/registry/ and prints every number; nothing
here is asserted (targets belong to benchmarks, not unit tests).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import boto3

SECTIONS = ("catalog", "cold_load", "registration", "sync")


@dataclass(frozen=True)
class RegistryBenchConfig:
    catalog_adapters: int = 10_000
    catalog_reads: int = 500
    cold_loads: int = 8
    object_bytes: int = 8 << 20  # about a rank-16 LoRA on every linear of flan-t5-small, in fp32
    registrations: int = 20
    sync_catalog_sizes: tuple[int, ...] = (1_000, 100_000)
    sync_registrations: int = 40  # per catalog size
    sync_replicas: int = 2


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _summary(xs: list[float]) -> dict:
    return {"p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99), "mean": statistics.fmean(xs), "n": len(xs)}


def _entries(n: int, base: str = "bench-base", start: int = 0):
    from serve.registry.catalog import CatalogEntry

    spec = {"kind": "lora", "rank": 8, "targets": ["q", "v"]}
    return [(CatalogEntry(base=base, base_name="bench", name=f"adapter-{i:06d}", version=1,
                          digest=f"{i:064x}", kind="lora", size_bytes=1 << 20, source="bench", spec=spec,
                          created_at=time.time()), None) for i in range(start, start + n)]


def catalog_reads(pg_url: str, work: Path, cfg: RegistryBenchConfig, log) -> dict:
    import random

    from serve.registry.catalog import SQLiteCatalog
    from serve.registry.postgres import PostgresCatalog

    rows = _entries(cfg.catalog_adapters)
    out = {}
    for label, catalog in (("sqlite", SQLiteCatalog(work / "bench.sqlite")), ("postgres", PostgresCatalog(pg_url))):
        catalog.import_rows(rows)
        rng = random.Random(0)
        get_s, gen_s = [], []
        for _ in range(cfg.catalog_reads):
            name = f"adapter-{rng.randrange(cfg.catalog_adapters):06d}"
            t0 = time.perf_counter()
            assert catalog.get("bench-base", name) is not None
            get_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            catalog.generation()
            gen_s.append(time.perf_counter() - t0)
        active_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert len(catalog.active("bench-base")[1]) == cfg.catalog_adapters
            active_s.append(time.perf_counter() - t0)
        out[label] = {"get_s": _summary(get_s), "generation_s": _summary(gen_s), "active_s": _summary(active_s)}
        log(f"catalog {label}: get p50 {out[label]['get_s']['p50'] * 1e3:.3f} ms, generation p50 "
            f"{out[label]['generation_s']['p50'] * 1e3:.3f} ms, active ({cfg.catalog_adapters}) p50 "
            f"{out[label]['active_s']['p50'] * 1e3:.1f} ms")
        if hasattr(catalog, "close"):
            catalog.close()
    out["get_p50_ratio_postgres_vs_sqlite"] = out["postgres"]["get_s"]["p50"] / out["sqlite"]["get_s"]["p50"]
    return out


def cold_loads(store_url: str, work: Path, cfg: RegistryBenchConfig, log) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from serve.registry.files import directory_digest
    from serve.registry.node_cache import NodeCache
    from serve.registry.s3 import S3Store
    from serve.registry.store import LocalStore

    src = work / "object"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    save_file({"w": torch.randn(cfg.object_bytes // 4)}, str(src / "adapter_model.safetensors"))
    digest = directory_digest(src)
    local = LocalStore(work / "local-store")
    with local.staging() as staged:
        for f in src.iterdir():
            shutil.copy2(f, staged / f.name)
        local.put(staged, digest)
    remote = S3Store(store_url, NodeCache(work / "node-cache", 1 << 40))
    with remote.staging() as staged:
        for f in src.iterdir():
            shutil.copy2(f, staged / f.name)
        remote.put(staged, digest)

    def load(path: Path) -> None:  # clone: touch every byte (load_file alone may map the file lazily)
        [t.clone() for t in load_file(str(Path(path) / "adapter_model.safetensors")).values()]

    local_s, cold_s = [], []
    for _ in range(cfg.cold_loads):
        t0 = time.perf_counter()
        load(local.fetch(digest))
        local_s.append(time.perf_counter() - t0)
        shutil.rmtree(remote.cache.path(digest), ignore_errors=True)  # a node-cache miss
        t0 = time.perf_counter()
        load(remote.fetch(digest))
        cold_s.append(time.perf_counter() - t0)
    out = {"object_bytes": cfg.object_bytes, "local_disk_s": _summary(local_s), "object_store_cold_s": _summary(cold_s)}
    out["cold_vs_local_ratio"] = out["object_store_cold_s"]["p50"] / out["local_disk_s"]["p50"]
    log(f"load {cfg.object_bytes >> 20} MiB: local disk p50 {out['local_disk_s']['p50'] * 1e3:.1f} ms, object "
        f"store cold p50 {out['object_store_cold_s']['p50'] * 1e3:.1f} ms ({out['cold_vs_local_ratio']:.1f}x)")
    return out


def registration_to_first_token(pg, moto, work: Path, cfg: RegistryBenchConfig, log) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from loadtests.registry_servers import Node, until
    from serve.engine.base import build_base

    base = build_base(work / "tiny-base", "tiny")
    bucket = moto.bucket("bench-src")
    s3 = boto3.client("s3")
    adapter = _tiny_lora(base, work / "lora")
    for p in adapter.iterdir():
        s3.put_object(Bucket=bucket, Key=f"lora/{p.name}", Body=p.read_bytes())
    env = {"PEFTSERVE_REGISTRY_URL": pg.database("bench"),
           "PEFTSERVE_STORE_URL": f"s3://{moto.bucket('bench-store')}/registry", **moto.env()}
    log("starting two nodes (two Ray clusters)...")
    a, b = Node("a", base, work, env), Node("b", base, work, env)
    try:
        a.wait_ready()
        b.wait_ready()
        waits = []
        for i in range(cfg.registrations):
            name = f"bench-{i}"
            t0 = time.perf_counter()
            r = a.register(name, f"s3://{bucket}/lora/")
            if r.status_code != 201:
                raise RuntimeError(f"registration failed: {r.status_code} {r.text}")
            ok, _ = until(lambda n=name: b.http.post("/generate", json={
                "inputs": "bench", "parameters": {"max_new_tokens": 1, "adapter_id": n}}).status_code == 200,
                30, step_s=0.01)
            if not ok:
                raise RuntimeError(f"{name} never served on node b")
            waits.append(time.perf_counter() - t0)
            log(f"registration {i + 1}/{cfg.registrations}: first token on the other node after "
                f"{waits[-1] * 1e3:.0f} ms")
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Node.stop, (a, b)))
    out = {"seconds": _summary(waits)}
    log(f"registration -> first token on the other node: p50 {out['seconds']['p50'] * 1e3:.0f} ms, p99 "
        f"{out['seconds']['p99'] * 1e3:.0f} ms")
    return out


def incremental_sync(pg, moto, work: Path, cfg: RegistryBenchConfig, log) -> dict:
    """Registration -> servable on every replica, and the cost of one change, at each catalog size."""
    from loadtests.registry_servers import CONFIG, Node, until
    from serve.engine.base import FINGERPRINT_FILE, build_base
    from serve.registry.postgres import PostgresCatalog

    base = build_base(work / "tiny-base-sync", "tiny")
    fingerprint = (base / FINGERPRINT_FILE).read_text().strip()
    bucket = moto.bucket("sync-src")
    adapter = _tiny_lora(base, work / "lora-sync")
    s3 = boto3.client("s3")
    for p in adapter.iterdir():
        s3.put_object(Bucket=bucket, Key=f"lora/{p.name}", Body=p.read_bytes())
    url = pg.database("sync")
    catalog = PostgresCatalog(url)
    serve_config = {"applications": [{"name": "peftserve", "route_prefix": "/", "args": CONFIG,
                                      "import_path": "serve.app.builder:app_builder", "deployments": [
                                          {"name": "EngineReplica", "ray_actor_options": {"num_cpus": 0.5}},
                                          {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.25}}]}]}
    env = {"PEFTSERVE_REGISTRY_URL": url, "PEFTSERVE_STORE_URL": f"s3://{moto.bucket('sync-store')}/registry",
           **moto.env()}
    out: dict = {"replicas": cfg.sync_replicas, "sizes": {}}
    in_catalog = 0
    node = None
    try:
        for size in cfg.sync_catalog_sizes:
            t0 = time.perf_counter()
            catalog.import_rows(_entries(size - in_catalog, base=fingerprint, start=in_catalog))
            log(f"catalog: {size} adapters ({size - in_catalog} rows bulk-inserted in "
                f"{time.perf_counter() - t0:.1f} s)")
            in_catalog = size
            if node is None:  # started once: the catalog grows under the running replicas
                log(f"starting one server with {cfg.sync_replicas} engine replicas")
                node = Node("sync", base, work, env, config=serve_config, args=("--replicas", str(cfg.sync_replicas)))
                node.wait_ready()
            changes_s, active_s = _catalog_change_cost(catalog, fingerprint)
            lags, applies = [], []
            for i in range(cfg.sync_registrations):
                name = f"sync-{size}-{i}"
                r = node.register(name, f"s3://{bucket}/lora/")
                if r.status_code != 201:
                    raise RuntimeError(f"registration failed: {r.status_code} {r.text}")
                time.sleep(0.2)
                if (i + 1) % 10 == 0 or i + 1 == cfg.sync_registrations:
                    names = {f"sync-{size}-{j}" for j in range(i - (i % 10), i + 1)}
                    seen, _ = until(lambda n=names, at=node: _applied(at, n, cfg.sync_replicas), 30, step_s=0.5)
                    if not seen:
                        raise RuntimeError(f"registrations {sorted(names)} not applied on every replica")
                    for per_replica in seen.values():
                        lags.append(max(c["lag_s"] for c in per_replica))  # servable on every replica
                        applies += [c["apply_s"] for c in per_replica]
            cell = {"registration_to_every_replica_s": _summary(lags), "apply_one_change_s": _summary(applies),
                    "delta_query_s": _summary(changes_s), "snapshot_query_s": _summary(active_s)}
            out["sizes"][str(size)] = cell
            log(f"{size} adapters: registration -> servable on every replica p50 "
                f"{cell['registration_to_every_replica_s']['p50'] * 1e3:.0f} ms, p99 "
                f"{cell['registration_to_every_replica_s']['p99'] * 1e3:.0f} ms; one change applied p50 "
                f"{cell['apply_one_change_s']['p50'] * 1e3:.1f} ms; delta query p50 "
                f"{cell['delta_query_s']['p50'] * 1e3:.2f} ms vs snapshot re-read p50 "
                f"{cell['snapshot_query_s']['p50'] * 1e3:.0f} ms")
    finally:
        catalog.close()
        if node is not None:
            node.stop()
    small, large = (out["sizes"][str(n)] for n in (cfg.sync_catalog_sizes[0], cfg.sync_catalog_sizes[-1]))
    out["large_vs_small"] = {k: large[k]["p50"] / small[k]["p50"] for k in
                             ("apply_one_change_s", "delta_query_s", "snapshot_query_s",
                              "registration_to_every_replica_s")}
    return out


def _applied(node, names: set[str], replicas: int) -> dict[str, list[dict]] | None:
    """{name: [the applied change on each replica]} once every replica reports every name, else None."""
    reports = node.http.get("/info").json()["replicas"]
    if len(reports) != replicas:
        return None
    found: dict[str, list[dict]] = {}
    for rep in reports:
        recent = {c["name"]: c for c in rep["sync"]["recent"]}
        for name in names:
            if name not in recent:
                return None
            found.setdefault(name, []).append(recent[name])
    return found


def _catalog_change_cost(catalog, base: str, samples: int = 20) -> tuple[list[float], list[float]]:
    """(seconds of the delta query for one change, seconds of the snapshot re-read it replaces)."""
    from serve.registry.catalog import CatalogEntry

    delta, snap = [], []
    for i in range(samples):
        entry = CatalogEntry(base=base, base_name="bench", name=f"probe-{i}", version=1, digest=f"{i:064x}",
                             kind="lora", size_bytes=1, source="bench", spec={"kind": "lora"}, created_at=0.0)
        gen = catalog.generation()
        catalog.publish(entry, replace=True)
        t0 = time.perf_counter()
        assert len(catalog.changes(base, gen).upserts) == 1
        delta.append(time.perf_counter() - t0)
        if i < 5:
            t0 = time.perf_counter()
            catalog.active(base)
            snap.append(time.perf_counter() - t0)
    for i in range(samples):
        catalog.retire(base, f"probe-{i}")
    return delta, snap


def _tiny_lora(base_dir: Path, out: Path) -> Path:
    """A LoRA of the tiny base (peft), files only (no README)."""
    from peft import LoraConfig, get_peft_model

    from serve.engine.base import load_base

    model = load_base(str(base_dir)).model
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules=["q", "v"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    cat = results.get("catalog")
    if cat:
        labels = ["get", "generation", "active"]
        for i, backend in enumerate(("sqlite", "postgres")):
            vals = [cat[backend][f"{k}_s"]["p50"] * 1e3 for k in labels]
            axes[0].bar([x + 0.4 * i for x in range(3)], vals, width=0.4, label=backend)
        axes[0].set_xticks([x + 0.2 for x in range(3)], labels)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("p50 ms (log)")
        axes[0].set_title(f"catalog reads, {results['config']['catalog_adapters']} adapters")
        axes[0].legend()
    cold = results.get("cold_load")
    if cold:
        axes[1].bar(["local disk", "object store (cold)"], [cold["local_disk_s"]["p50"] * 1e3,
                                                            cold["object_store_cold_s"]["p50"] * 1e3])
        axes[1].set_ylabel("p50 ms")
        axes[1].set_title(f"adapter load, {cold['object_bytes'] >> 20} MiB ({cold['cold_vs_local_ratio']:.1f}x)")
    reg = results.get("registration")
    if reg:
        axes[2].bar(["p50", "p99"], [reg["seconds"]["p50"] * 1e3, reg["seconds"]["p99"] * 1e3])
        axes[2].set_ylabel("ms")
        axes[2].set_title("registration on A -> first token on B")
    sync = results.get("sync")
    if sync:
        sizes = list(sync["sizes"])
        for i, (key, label) in enumerate((("registration_to_every_replica_s", "registration -> every replica p99"),
                                          ("apply_one_change_s", "apply one change p50"),
                                          ("delta_query_s", "delta query p50"),
                                          ("snapshot_query_s", "snapshot re-read p50 (replaced)"))):
            q = "p99" if key.startswith("registration") else "p50"
            axes[3].bar([x + 0.2 * i for x in range(len(sizes))], [sync["sizes"][n][key][q] * 1e3 for n in sizes],
                        width=0.2, label=label)
        axes[3].set_xticks([x + 0.3 for x in range(len(sizes))], [f"{int(n):,} adapters" for n in sizes])
        axes[3].set_yscale("log")
        axes[3].set_ylabel("ms (log)")
        axes[3].set_title("incremental sync, by catalog size")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_registry_bench(out: Path, cfg: RegistryBenchConfig = RegistryBenchConfig(), sections=SECTIONS) -> dict:
    from loadtests.registry_servers import MotoServer, PostgresServer, moto_bin, pg_bin

    def log(msg: str) -> None:
        print(f"[registry bench] {msg}", flush=True)

    if pg_bin() is None or moto_bin() is None:
        raise RuntimeError("the registry bench needs PostgreSQL (initdb, pg_ctl) and moto_server installed")
    import os

    work = Path(tempfile.mkdtemp(prefix="peftserve-regbench-"))
    pg, moto = PostgresServer(pg_bin()), MotoServer(moto_bin())
    saved = {k: os.environ.get(k) for k in moto.env()}
    os.environ.update(moto.env())
    results: dict = {"config": cfg.__dict__, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        pg.start()
        pg.create_role()
        if "catalog" in sections:
            results["catalog"] = catalog_reads(pg.database("catbench"), work, cfg, log)
        if "cold_load" in sections:
            results["cold_load"] = cold_loads(f"s3://{moto.bucket('cold')}/objects", work, cfg, log)
        if "registration" in sections:
            results["registration"] = registration_to_first_token(pg, moto, work, cfg, log)
        if "sync" in sections:
            results["sync"] = incremental_sync(pg, moto, work, cfg, log)
    finally:
        moto.stop()
        pg.destroy()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "results.json"
    if set(sections) != set(SECTIONS) and earlier.exists():  # keep the sections this run did not measure
        kept = {k: v for k, v in json.loads(earlier.read_text()).items() if k in SECTIONS and k not in sections}
        results.update(kept)
        results["kept_from_earlier"] = sorted(kept)
    earlier.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "registry.png")
    log(f"results: {out}/results.json, {out}/registry.png")
    return results
