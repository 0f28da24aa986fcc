"""`peftserve bench --routing`: adapter-aware routing against random routing, 2 engine replicas, Zipf over
1,000 adapters.

One loopback Serve app (Ray on this machine, SQLite registry) with 2 EngineReplicas whose caches hold far
fewer adapters than are requested (device slots and host bytes sized to `resident` adapters), 1,000 small
LoRAs of the tiny random base registered once. The same seeded Zipf(s) request sequence is sent in both
modes, `concurrency` requests in flight (asyncio, POST /generate), after an unmeasured warm-up:

- random: `residency_routing: false`, Ray Serve's default router (power of two choices);
- adapter-aware: Ray Serve model multiplexing, `multiplexed_model_id` = the adapter; each replica
  advertises the last `resident` adapters it served (serve/app/replica.py).

Each mode gets fresh replicas (redeploy) per round, rounds alternate (random, aware, random, aware, ...).
Measured per round: cache hit rates from the engines' own counters (/metrics deltas over the measured
requests, summed over replicas): device-tier hits / requests, and resident hits (device or host: no disk
load) / requests; requests/s and generated tokens/s; p50/p99 latency; adapters registered per replica.

Writes results.json and routing.png under loadtests/results/routing/; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("random", "adapter-aware")


@dataclass(frozen=True)
class RoutingBenchConfig:
    adapters: int = 1000
    zipf_s: float = 1.0
    replicas: int = 2
    resident: int = 16  # adapters each replica's host cache holds (and advertises)
    device_slots: int = 8  # LoRA slots per replica
    lora_rank: int = 4
    concurrency: int = 16
    warmup_requests: int = 600
    requests: int = 2000
    new_tokens: int = 8
    rounds: int = 2
    seed: int = 0


def log(msg: str) -> None:
    print(f"[routing bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def app_args(cfg: RoutingBenchConfig, base: Path, registry_dir: Path, adapter_bytes: int, aware: bool) -> dict:
    return {"engine": {"base": str(base), "max_batch_rows": cfg.concurrency, "max_new_tokens_cap": cfg.new_tokens,
                       "max_queue": 4 * cfg.concurrency, "request_timeout_s": 120, "max_rank": cfg.lora_rank,
                       "device_slots": {"lora": cfg.device_slots, "ia3": 1, "bitfit": 1, "prompt": 1,
                                        "adapterhub": 1},
                       "host_bytes": cfg.resident * adapter_bytes + adapter_bytes // 2},
            "registry_dir": str(registry_dir), "demo_adapters": False, "metrics_push_interval_s": 0.5,
            "residency_routing": aware, "resident_adapters_hint": cfg.resident}


def application(cfg: RoutingBenchConfig, args: dict):
    from serve.app.builder import build_app
    from serve.app.config import AppConfig

    return build_app(AppConfig.model_validate(args), {
        "EngineReplica": {"num_replicas": cfg.replicas, "ray_actor_options": {"num_cpus": 0.5}},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25}}, "MetricsHub": {"ray_actor_options": {"num_cpus": 0}}})


async def _send(url: str, names: list[str], cfg: RoutingBenchConfig) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tokens = 0
    queue = list(reversed(names))

    async def client(http):
        nonlocal tokens
        while queue:
            name = queue.pop()
            t0 = time.perf_counter()
            r = await http.post("/generate", json={"inputs": "route me to my adapter", "parameters": {
                "adapter_id": name, "max_new_tokens": cfg.new_tokens, "details": True}})
            latencies.append(time.perf_counter() - t0)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                tokens += r.json()["details"]["generated_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=cfg.concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(cfg.concurrency)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(names), "statuses": statuses, "seconds": seconds, "requests_per_s": len(names) / seconds,
            "tokens_per_s": tokens / seconds, "p50_latency_s": latencies[len(latencies) // 2],
            "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def _cache_counts(url: str) -> dict[str, float]:
    """Cache hits/misses per tier summed over replicas, and finished requests per engine replica."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from loadtests.metrics_scrape import COUNTERS, _sum, parse

    text = httpx.get(f"{url}/metrics", timeout=30).text
    s = parse(text)
    out = {f"{what}_{tier}": _sum(s, COUNTERS[what], tier=tier) for what in ("hits", "misses")
           for tier in ("device", "host")}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == COUNTERS["requests"]:
                key = f"requests@{sample.labels['replica']}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def measure(url: str, warmup: list[str], names: list[str], cfg: RoutingBenchConfig) -> dict:
    import httpx

    asyncio.run(_send(url, warmup, cfg))
    time.sleep(1.5)  # metric pushes settle (0.5 s interval)
    before = _cache_counts(url)
    out = asyncio.run(_send(url, names, cfg))
    time.sleep(1.5)
    after = _cache_counts(url)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    lookups = d["hits_device"] + d["misses_device"]  # one device lookup per request (host only on a miss)
    out["requests_per_replica"] = sorted((round(v) for k, v in d.items() if k.startswith("requests@")), reverse=True)
    out["cache"] = {k: v for k, v in d.items() if not k.startswith("requests@")}
    out["device_hit_rate"] = d["hits_device"] / lookups if lookups else None
    out["resident_hit_rate"] = (d["hits_device"] + d["hits_host"]) / lookups if lookups else None
    out["adapters_per_replica"] = sorted(r["adapters"] for r in httpx.get(f"{url}/info", timeout=30).json()["replicas"])
    return out


def _register_all(url: str, paths: list[Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(p: Path) -> None:
        r = httpx.post(f"{url}/adapters", json={"name": p.name, "source": str(p)}, timeout=120)
        if r.status_code not in (201, 409):
            raise RuntimeError(f"registering {p.name}: {r.status_code} {r.text}")

    with ThreadPoolExecutor(4) as pool:
        for i, _ in enumerate(pool.map(one, paths)):
            if (i + 1) % 200 == 0:
                log(f"registered {i + 1}/{len(paths)}")


def run_routing_bench(out: Path, work: Path, cfg: RoutingBenchConfig = RoutingBenchConfig()) -> dict:
    from loadtests.popularity import zipf
    from loadtests.workload import ensure_base, make_adapters
    from serve.app import local

    base = ensure_base(work, "tiny", cfg.seed)
    paths = make_adapters(base, work / "adapters" / base.name, "lora", cfg.adapters, cfg.lora_rank, seed=cfg.seed,
                          progress=log)
    adapter_bytes = sum(f.stat().st_size for f in paths[0].iterdir() if f.suffix == ".safetensors")
    import random

    # one draw for warm-up and measured requests: the same popularity ranking in both
    seq = zipf([p.name for p in paths], cfg.warmup_requests + cfg.requests, random.Random(cfg.seed), cfg.zipf_s)
    warmup, measured = seq[:cfg.warmup_requests], seq[cfg.warmup_requests:]
    registry_dir = Path(tempfile.mkdtemp(prefix="peftserve-routing-"))
    results: dict = {"config": asdict(cfg), "adapter_bytes": adapter_bytes,
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": []}
    url = None
    try:
        for r in range(cfg.rounds):
            for mode in MODES:
                app = application(cfg, app_args(cfg, base, registry_dir, adapter_bytes, mode == "adapter-aware"))
                if url is None:
                    log("starting Ray and the app (2 engine replicas)")
                    url = local.start(app, port=local.free_port(), num_cpus=2, ready_timeout_s=300)
                    log(f"registering {len(paths)} adapters")
                    _register_all(url, paths)
                # fresh replicas for every measured mode: none starts with the adapters its registration
                # prefetched, each registers what its own requests need
                local.redeploy(app, url, ready_timeout_s=300)
                cell = {"round": r, "mode": mode, **measure(url, warmup, measured, cfg)}
                results["rounds"].append(cell)
                log(f"round {r} {mode}: device hit {cell['device_hit_rate']:.3f}, resident hit "
                    f"{cell['resident_hit_rate']:.3f}, {cell['requests_per_s']:.1f} req/s, "
                    f"p99 {cell['p99_latency_s'] * 1e3:.0f} ms, requests per replica {cell['requests_per_replica']}, "
                    f"adapters per replica {cell['adapters_per_replica']}, "
                    f"statuses {cell['statuses']}")
    finally:
        if url is not None:
            local.stop()
        shutil.rmtree(registry_dir, ignore_errors=True)
    results["summary"] = summarize(results["rounds"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "routing.png")
    s = results["summary"]
    log(f"adapter-aware vs random: resident hit {s['adapter-aware']['resident_hit_rate']:.3f} vs "
        f"{s['random']['resident_hit_rate']:.3f}, device hit {s['adapter-aware']['device_hit_rate']:.3f} vs "
        f"{s['random']['device_hit_rate']:.3f}, throughput ratio {s['throughput_ratio']:.2f} (paired median)")
    log(f"results: {out}/results.json, {out}/routing.png")
    return results


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        cells = [c for c in rounds if c["mode"] == mode]
        out[mode] = {k: statistics.median(c[k] for c in cells) for k in
                     ("device_hit_rate", "resident_hit_rate", "requests_per_s", "tokens_per_s", "p50_latency_s",
                      "p99_latency_s")}
    pairs = [(a, r) for a, r in zip([c for c in rounds if c["mode"] == "adapter-aware"],
                                    [c for c in rounds if c["mode"] == "random"], strict=False)]
    out["throughput_ratio"] = statistics.median(a["requests_per_s"] / r["requests_per_s"] for a, r in pairs)
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(MODES))
    for i, (key, label) in enumerate((("device_hit_rate", "device tier"), ("resident_hit_rate", "device or host"))):
        axes[0].bar([v + 0.4 * i for v in x], [s[m][key] for m in MODES], width=0.4, label=label)
    axes[0].set_xticks([v + 0.2 for v in x], MODES)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("cache hit rate (per request)")
    axes[0].legend()
    cfg = results["config"]
    axes[0].set_title(f"Zipf s={cfg['zipf_s']} over {cfg['adapters']} adapters, {cfg['replicas']} replicas")
    axes[1].bar(list(MODES), [s[m]["requests_per_s"] for m in MODES])
    axes[1].set_ylabel("requests/s")
    axes[1].set_title(f"throughput (aware / random = {s['throughput_ratio']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
