"""HTTP load: register adapters with a server (started here on loopback, or given), run the locust
scenarios headless, scrape the server's /metrics before and after each, write a summary.

Adapter names outnumber adapter files: N names (100, 1,000) are registered over a pool of distinct
files of all four kinds. The registry's store is content-addressed (identical files are stored once),
so names that share a file can share a cached copy. The burst scenario's cold requests therefore go to
extra names that each have a file of their own (small (IA)3 and BitFit adapters, distinct random
weights, never registered before in the run): each cold request is a real disk load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtests import popularity
from loadtests.metrics_scrape import delta_summary, scrape
from loadtests.presets import KINDS, Preset
from loadtests.workload import ensure_base, make_adapters, random_texts

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def log(msg: str) -> None:
    print(f"[bench http {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adapter_pool(preset: Preset, base_dir: Path, work: Path, per_kind: int) -> list[Path]:
    root = work / "adapters" / base_dir.name
    by_kind = [make_adapters(base_dir, root, k, per_kind, preset.lora_rank, preset.prompt_tokens, preset.seed)
               for k in KINDS]
    return [by_kind[i % len(KINDS)][i // len(KINDS)] for i in range(per_kind * len(KINDS))]  # kinds interleaved


def cold_adapters(preset: Preset, base_dir: Path, work: Path, skip: int, count: int) -> list[Path]:
    """`count` adapter files, each with its own weights, for the burst scenario's cold names: (IA)3 and
    BitFit alternating (tens to hundreds of KiB each), indices from `skip` per kind, so they share no
    content with the pool (which uses the first indices) nor with an earlier call's (pass a larger skip)."""
    root = work / "adapters" / base_dir.name
    per_kind = skip + (count + 1) // 2
    ia3, bitfit = (make_adapters(base_dir, root, k, per_kind, preset.lora_rank, preset.prompt_tokens, preset.seed)
                   for k in ("ia3", "bitfit"))
    return [(ia3, bitfit)[i % 2][skip + i // 2] for i in range(count)]


def register_names(url: str, pool: list[Path], count: int, prefix: str, token: str | None) -> list[str]:
    """Register `count` names over the pool (round-robin, so kinds mix); existing names are kept."""
    names = [f"{prefix}-{i:05d}" for i in range(count)]
    register(url, [(name, pool[i % len(pool)]) for i, name in enumerate(names)], token)
    return names


def register(url: str, pairs: list[tuple[str, Path]], token: str | None) -> None:
    """POST /adapters for each (name, source); a name registered by an earlier run (409) is kept."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for i, (name, path) in enumerate(pairs):
            r = client.post("/adapters", json={"name": name, "source": str(path.resolve())})
            if r.status_code not in (200, 201, 409):  # 409: registered by an earlier run
                raise RuntimeError(f"registering {name} failed: HTTP {r.status_code} {r.text[:300]}")
            if (i + 1) % 250 == 0:
                log(f"registered {i + 1}/{len(pairs)}")


def run_locust(url: str, plan: dict, users: int, seconds: float, workdir: Path) -> dict:
    """Headless locust over `plan`; returns the users' per-request records (locust's CSVs stay in workdir)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan_file, side_file, prefix = workdir / "plan.json", workdir / "side.json", workdir / "locust"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PEFTSERVE_LOAD_PLAN": str(plan_file), "PEFTSERVE_LOAD_SIDE": str(side_file)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r",
           str(users), "--run-time", f"{int(seconds)}s", "--host", url, "--csv", str(prefix), "--only-summary",
           "--loglevel", "WARNING", "--stop-timeout", "30"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: some requests failed, which the summary reports
        raise RuntimeError(f"locust exited {proc.returncode}: {proc.stderr[-2000:]}")
    if not side_file.exists():
        raise RuntimeError(f"locust wrote no summary ({side_file}); its stderr: {proc.stderr[-2000:]}")
    return {"side": json.loads(side_file.read_text()), "wall_s": wall}


def summarize(locust: dict, metrics: dict) -> dict:
    """Latency, TTFT and throughput from the users' own per-request records (exact, not locust's
    rounded buckets); locust's CSV stays next to the results."""
    from loadtests.measure import percentile

    side = locust["side"]
    lat, ttft = side.get("latencies", []), side.get("ttfts", [])
    span = max(1e-9, (side.get("last_end") or 0) - (side.get("first_start") or 0))
    return {
        "requests": side.get("finished", 0) + sum(side.get("errors", {}).values()),
        "errors": sum(side.get("errors", {}).values()), "error_kinds": side.get("errors", {}),
        "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
        "client_ttft_p50_s": percentile(ttft, 50), "client_ttft_p95_s": percentile(ttft, 95),
        "client_ttft_p99_s": percentile(ttft, 99),
        "requests_per_s": side.get("finished", 0) / span, "tokens_per_s": side.get("tokens", 0) / span,
        "tokens": side.get("tokens", 0), "load_seconds": span, "locust_wall_s": locust["wall_s"],
        "server": metrics,
    }


def run_http(preset: Preset, out: Path, work: Path, target: str, scenarios: tuple[str, ...], command: str,
             api_key: str | None = None) -> dict:
    from loadtests.measure import machine, quiet_libraries

    quiet_libraries()
    for s in scenarios:
        if s not in popularity.SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; choose from {', '.join(popularity.SCENARIOS)}")
    base_dir = ensure_base(work, preset.base_preset, preset.seed)
    per_kind = max(2, min(8, preset.http_adapters[0] // 4))
    pool = adapter_pool(preset, base_dir, work, per_kind=per_kind)
    cold_skip = per_kind  # cold files start past the pool's; each adapter count gets fresh ones
    started_here = target == "start"
    server = LoopbackServer(preset, base_dir, work, out / "server.log") if started_here else None
    url = server.url if server else target.rstrip("/")
    results = {"preset": preset.to_dict(), "machine": machine(), "command": command, "url": url,
               "started_server": started_here, "scenarios": {}}
    try:
        texts = random_texts(64, preset.input_chars, preset.seed + 17)
        for count in preset.http_adapters:
            names = register_names(url, pool, count, f"load{count}", api_key)
            cold: list[str] = []
            if "burst" in scenarios:
                need = popularity.cold_slots(preset.http_requests)
                files = cold_adapters(preset, base_dir, work, cold_skip, need)
                cold_skip += (need + 1) // 2
                cold = [f"load{count}-cold-{i:05d}" for i in range(need)]
                register(url, list(zip(cold, files, strict=True)), api_key)
            for scenario in scenarios:
                label = f"{scenario}-{count}"
                seq = popularity.sequence(scenario, names, preset.http_requests, preset.seed,
                                          cold=cold if scenario == "burst" else None)
                plan = {"requests": [{"inputs": texts[i % len(texts)], "adapter": a, "label": scenario}
                                     for i, a in enumerate(seq)],
                        "max_new_tokens": preset.http_new_tokens, "api_key": api_key}
                before = scrape(url, api_key)
                locust = run_locust(url, plan, preset.http_users, preset.http_seconds, out / "locust" / label)
                after = settled_scrape(url, api_key, before, locust["side"])
                summary = summarize(locust, delta_summary(before, after))
                results["scenarios"][label] = {"scenario": scenario, "adapters": count,
                                               "cold_adapters": len(set(seq) & set(cold)), **summary}
                log(f"{label}: {summary['requests']} requests, {summary['errors']} errors, p50 "
                    f"{summary['p50_s'] or 0:.3f} s, p99 {summary['p99_s'] or 0:.3f} s, "
                    f"{summary['tokens_per_s']:.1f} tok/s")
    finally:
        if server:
            server.stop()
    write(results, out)
    return results


def settled_scrape(url: str, token: str | None, before: dict, side: dict, timeout_s: float = 15.0) -> dict:
    """Scrape /metrics until the server counts every request the users ended (replicas push their
    metrics every `metrics_push_interval_s`, so the last ones arrive a moment after the load)."""
    ended = side.get("finished", 0) + sum(side.get("errors", {}).values())
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(url, token)
        if delta_summary(before, after)["requests"] >= ended or time.monotonic() > deadline:
            return after
        time.sleep(0.5)


class LoopbackServer:
    """`peftserve serve` in a child process on 127.0.0.1, sized for the preset; stopped with SIGTERM
    (the launcher's clean shutdown), killed only if that hangs. A child process keeps Ray's cluster
    out of the benchmark's own process."""

    def __init__(self, preset: Preset, base_dir: Path, work: Path, log_file: Path, ready_timeout_s: float = 600,
                 engine: dict | None = None, env: dict[str, str] | None = None, app: dict | None = None):
        """`engine`: the server's whole engine config (default: sized for the locust scenarios); `env`:
        extra environment for the server (e.g. OMP_NUM_THREADS, which Ray otherwise sets to 1); `app`: other
        app settings over the defaults here (topology, metrics_push_interval_s...)."""
        import yaml

        from serve.app.local import free_port

        if engine is None:
            engine = {"base": str(base_dir), "device": preset.device, "dtype": preset.dtype,
                      "max_rank": preset.lora_rank, "max_virtual_tokens": max(preset.prompt_tokens, 1),
                      "max_batch_rows": preset.http_users, "max_new_tokens_cap": max(preset.http_new_tokens, 8),
                      "device_slots": {k: 8 for k in KINDS}, "host_bytes": "1GiB", "max_queue": 4096}
        config = {"engine": engine,
                  "registry_dir": str(work / "registry" / base_dir.name), "demo_adapters": False,
                  "metrics_push_interval_s": 0.5, **(app or {})}
        log_file.parent.mkdir(parents=True, exist_ok=True)
        cfg = log_file.with_suffix(".yaml")
        cfg.write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # logical CPUs for Ray's scheduler (the app's three deployments ask for 2.5); torch threads are separate
        cmd = [sys.executable, "-m", "serve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--config", str(cfg), "--num-cpus", str(max(4, os.cpu_count() or 1))]
        log(f"starting a loopback server: {' '.join(cmd)} (log: {log_file})")
        self._log = open(log_file, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        try:
            self._wait_healthy(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the server did not become healthy within {timeout_s:.0f} s; see {self._log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def markdown(results: dict) -> str:
    lines = [f"# peftserve HTTP load — preset `{results['preset']['name']}`", "",
             f"Command: `{results['command']}`  ", f"Server: {results['url']} "
             f"({'started by the bench, loopback' if results['started_server'] else 'given'})  ",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores  ",
             f"{results['preset']['http_requests']} requests per scenario, {results['preset']['http_users']} "
             f"closed-loop users, {results['preset']['http_new_tokens']} new tokens each.", "",
             "Client TTFT is the first SSE event; TGI framing sends a token once the next one exists, so it "
             "is about the second token's time. Server TTFT comes from the server's own histogram.", "",
             "Burst: cold requests go to names with files of their own ((IA)3 / BitFit, distinct weights, "
             "registered for the run), so each is a real disk load; `cold names` counts them.", "",
             "| scenario | adapters | cold names | requests | errors | p50 s | p95 s | p99 s | client TTFT p50 s | server TTFT "
             "mean s | tokens/s | cold loads (disk->host) | warm swaps (host->device) | swap p99 s disk->host "
             "/ host->device | evictions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    for s in results["scenarios"].values():
        m = s["server"]
        lines.append(
            f"| {s['scenario']} | {s['adapters']} | {s.get('cold_adapters', '-')} | {s['requests']} | {s['errors']} | {f(s['p50_s'])} | "
            f"{f(s['p95_s'])} | {f(s['p99_s'])} | {f(s['client_ttft_p50_s'])} | {f(m.get('ttft_mean_s'))} | "
            f"{s['tokens_per_s']:.1f} | {f(m['swaps'].get('disk_to_host', {}).get('count'))} | "
            f"{f(m['swaps'].get('host_to_device', {}).get('count'))} | "
            f"{f(m['swaps'].get('disk_to_host', {}).get('p99_s'))} / "
            f"{f(m['swaps'].get('host_to_device', {}).get('p99_s'))} | {f(m.get('evictions'))} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "http_results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "http_results.md").write_text(markdown(results))
    log(f"results: {out}/http_results.json, http_results.md")
