"""Serving-layer cost: generated tokens/s through HTTP + Ray Serve over the in-process engine's, same load.

One in-process engine and, in turn, one loopback server (`LoopbackServer`: `peftserve serve` in a child process)
per topology, with the same engine config: first `split` (Ingress -> EngineReplica, the default topology; the
judged figure), then `combined` (each EngineReplica answers HTTP itself, reported beside it). With each server
the rounds alternate (engine, http, engine, http, ...), so the two never compute at the same moment (they share
the machine's cores) and slow drifts of the machine hit both sides alike. Each pair starts with one untimed
warm-up round per side (adapters resident, allocator warm).

A round: `serving_concurrency` requests sent at once (asyncio; `engine.submit` in-process, POST /generate
over one keep-alive aiohttp session), `serving_new_tokens` each, greedy; tokens/s = generated tokens / wall
time from the first send to the last result. The client is aiohttp, as in vLLM's benchmark_serving: on a host
whose few cores the client shares with the server, the client's CPU counts against the server, and httpx's
was 5-10 ms per request here against aiohttp's ~0.5 ms (cpu-small, 2026-12-05: 0.33-0.64 s against 0.03 s
per 64-request round). The client's CPU is still reported per round. The same texts and adapter
per row on both sides: base rows plus two adapters of each kind (LoRA, (IA)3, BitFit, prompt), cycled over
the rows. HTTP asks for `details` (to read generated_tokens), which makes the engine keep logprobs: the
in-process requests ask for logprobs too, so both sides do the same work.

ratio per round = http tokens/s / engine tokens/s of the same round; reported per topology: every round, the
median of those paired ratios (the judged figure: split, the default topology) and best-of (best http / best engine).
Target >= 0.9: reported, never asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from pathlib import Path

from loadtests.presets import KINDS, Preset
from loadtests.workload import Request, random_texts

TARGET = 0.9
TOPOLOGIES = ("split", "combined")  # the first, the default topology, is the judged figure


def log(msg: str) -> None:
    print(f"[bench serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def engine_fields(preset: Preset, base_dir: Path) -> dict:
    """The one engine config both sides run (the server's YAML `engine:` and the in-process EngineConfig)."""
    return {"base": str(base_dir), "device": preset.device, "dtype": preset.dtype, "max_rank": preset.lora_rank,
            "max_virtual_tokens": max(preset.prompt_tokens, 1), "max_batch_rows": preset.serving_concurrency,
            "max_new_tokens_cap": max(preset.serving_new_tokens, 8), "device_slots": {k: 8 for k in KINDS},
            "host_bytes": 2**30, "max_queue": 4096}


def serving_adapters(paths: dict[str, dict[str, Path]], per_kind: int = 2) -> dict[str, Path]:
    """Two adapters of each kind, kinds interleaved: lora-0, ia3-0, bitfit-0, prompt-0, lora-1, ..."""
    out = {}
    for i in range(per_kind):
        for kind in KINDS:
            name, path = list(paths[kind].items())[i]
            out[name] = path
    return out


def serving_requests(preset: Preset, adapters: list[str]) -> list[Request]:
    """Row i: text i, adapter (None, *adapters)[i mod (1 + len(adapters))]."""
    texts = random_texts(preset.serving_concurrency, preset.input_chars, preset.seed + 23)
    cycle = [None, *adapters]
    return [Request(t, cycle[i % len(cycle)], preset.serving_new_tokens) for i, t in enumerate(texts)]


def _complete(generated: int, finish: str | None, wanted: int) -> bool:
    """The requested number of tokens, or fewer because the model stopped at EOS."""
    return generated == wanted or (finish in ("eos", "eos_token") and 0 < generated <= wanted)


async def engine_round(engine, requests: list[Request]) -> dict:
    from serve.engine import GenerationParams, GenerationRequest

    reqs = [GenerationRequest(inputs=r.text, adapter=r.adapter,
                              params=GenerationParams(max_new_tokens=r.max_new_tokens, logprobs=True))
            for r in requests]
    t0 = time.perf_counter()
    done = await asyncio.gather(*(engine.submit(r) for r in reqs), return_exceptions=True)
    seconds = time.perf_counter() - t0
    errors = [repr(d) for d in done if isinstance(d, BaseException)]
    ok = [d for d in done if not isinstance(d, BaseException)]
    tokens = sum(d.generated_tokens for d in ok)
    return {"requests": len(reqs), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "complete": sum(_complete(d.generated_tokens, d.finish_reason, r.max_new_tokens)
                            for d, r in zip(done, requests, strict=True) if not isinstance(d, BaseException))}


def tgi_body(request: Request) -> dict:
    params = {"max_new_tokens": request.max_new_tokens, "details": True}
    if request.adapter is not None:
        params["adapter_id"] = request.adapter
    return {"inputs": request.text, "parameters": params}


async def _post(session, request: Request) -> tuple[int, int, str | None, str | None]:
    """(status, generated tokens, finish reason, error text) of one POST /generate (`session`: aiohttp, with
    the server's base URL)."""
    try:
        async with session.post("/generate", json=tgi_body(request)) as r:
            if r.status != 200:
                return r.status, 0, None, (await r.text())[:300]
            details = (await r.json()).get("details") or {}
    except Exception as e:  # noqa: BLE001 - a transport error is counted, not fatal to the round
        return 0, 0, None, repr(e)
    return 200, int(details.get("generated_tokens", 0)), details.get("finish_reason"), None


async def http_round(client, requests: list[Request]) -> dict:
    t0 = time.perf_counter()
    done = await asyncio.gather(*(_post(client, r) for r in requests))
    seconds = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for status, *_ in done:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    errors = [e for *_, e in done if e]
    tokens = sum(g for _, g, _, _ in done)
    return {"requests": len(requests), "errors": len(errors), "first_error": errors[0] if errors else None,
            "statuses": statuses, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "complete": sum(s == 200 and _complete(g, f, r.max_new_tokens)
                            for (s, g, f, _), r in zip(done, requests, strict=True))}


# Where the HTTP side's CPU goes: the server's processes by their Ray process titles
ROLES = (("proxy", "ray::ProxyActor"), ("ingress", ":Ingress"), ("engine replica", ":EngineReplica"),
         ("metrics hub", ":MetricsHub"), ("controller", "ray::ServeController"))


def cpu_by_role(server_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each serving process (the server and its Ray processes, found
    as its descendants: another Ray instance on the machine is not counted) and by this process (the client)."""
    import psutil

    me = psutil.Process().cpu_times()
    out = {"client (bench process)": me.user + me.system}
    if server_pid is None:
        return out
    try:
        root = psutil.Process(server_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            title, t = " ".join(p.cmdline()), p.cpu_times()
        except psutil.Error:  # exited between the listing and the read
            continue
        role = next((name for name, needle in ROLES if needle in title), "other server processes")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def _cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before.get(k, 0.0), 4) for k in after}


async def alternate(engine, url: str, requests: list[Request], rounds: int,
                    server_pid: int | None = None) -> tuple[dict, list[dict]]:
    """One warm-up pair, then `rounds` timed (engine, http) pairs; returns (warm-up, rounds). Each HTTP round
    records the CPU seconds every serving process used during it (`cpu_s`): the proxy's share, the ingress's."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=len(requests) + 8)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600.0)) as client:
        warm = {"engine": await engine_round(engine, requests), "http": await http_round(client, requests)}
        log(f"warm-up: engine {warm['engine']['tokens_per_s']:.1f} tok/s, http {warm['http']['tokens_per_s']:.1f} "
            "tok/s")
        out = []
        for i in range(rounds):
            e = await engine_round(engine, requests)
            before = cpu_by_role(server_pid)
            h = await http_round(client, requests)
            h["cpu_s"] = _cpu_delta(before, cpu_by_role(server_pid))
            ratio = h["tokens_per_s"] / e["tokens_per_s"] if e["tokens_per_s"] else None
            out.append({"round": i + 1, "engine": e, "http": h, "ratio": ratio})
            log(f"round {i + 1}/{rounds}: engine {e['tokens_per_s']:.1f} tok/s, http {h['tokens_per_s']:.1f} tok/s, "
                f"ratio {ratio:.3f}" if ratio is not None else f"round {i + 1}: engine produced no tokens")
    return warm, out


def cpu_shares(rounds: list[dict], cores: int) -> dict:
    """Median CPU seconds per HTTP round of each serving process, and its share of the round's CPU capacity
    (wall time x cores): what the proxy, the ingress and the client take from the engine's cores."""
    roles = sorted({k for r in rounds for k in r["http"].get("cpu_s", {})})
    out = {}
    for role in roles:
        secs = [r["http"]["cpu_s"].get(role, 0.0) for r in rounds if "cpu_s" in r["http"]]
        shares = [r["http"]["cpu_s"].get(role, 0.0) / (r["http"]["seconds"] * cores) for r in rounds
                  if "cpu_s" in r["http"]]
        out[role] = {"cpu_s_median": statistics.median(secs), "share_median": statistics.median(shares)}
    return out


def summarize(rounds: list[dict]) -> dict:
    import os

    eng = [r["engine"]["tokens_per_s"] for r in rounds]
    http = [r["http"]["tokens_per_s"] for r in rounds]
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    median = statistics.median(ratios) if ratios else None
    best = max(http) / max(eng) if eng and max(eng) > 0 else None
    return {"engine_tokens_per_s_runs": eng, "http_tokens_per_s_runs": http, "ratio_runs": ratios,
            "ratio_median": median, "ratio_best_of": best,
            "engine_tokens_per_s_median": statistics.median(eng) if eng else None,
            "http_tokens_per_s_median": statistics.median(http) if http else None,
            "target": TARGET, "target_applies_to": "ratio_median",
            "met": None if median is None else median >= TARGET,
            "http_cpu_by_process": cpu_shares(rounds, os.cpu_count() or 1)}


def serving(preset: Preset, base_dir: Path, work: Path, paths: dict[str, dict[str, Path]], out_dir: Path) -> dict:
    import torch

    from serve.engine import Engine, EngineConfig

    fields = engine_fields(preset, base_dir)
    adapters = serving_adapters(paths)
    requests = serving_requests(preset, list(adapters))
    threads = torch.get_num_threads()
    engine = Engine.from_config(EngineConfig(**fields))
    try:
        for name, path in adapters.items():
            engine.register_adapter(name, str(path))
        by_topology = {t: _against_server(t, preset, base_dir, work, fields, adapters, requests, engine, threads)
                       for t in TOPOLOGIES}
    finally:
        engine.close()
    judged = by_topology[TOPOLOGIES[0]]
    result = {
        "concurrency": preset.serving_concurrency, "new_tokens": preset.serving_new_tokens,
        "input_tokens": preset.input_chars, "rounds_timed": len(judged["rounds"]),
        "order": "engine then http, each round", "client": "aiohttp", "adapters": ["base", *adapters],
        "rows": {"base": sum(r.adapter is None for r in requests),
                 "adapter": sum(r.adapter is not None for r in requests)},
        "torch_threads": {"in_process": threads, "server_OMP_NUM_THREADS": threads},
        "engine_config": {k: v for k, v in fields.items() if k != "base"},
        "topology": TOPOLOGIES[0], **judged,
        "other_topologies": {t: by_topology[t] for t in TOPOLOGIES[1:]},
    }
    result["plot"] = str(plot(result, out_dir / "serving_overhead.png", preset.name))
    for t, r in by_topology.items():
        for load, x in ((f"{preset.serving_new_tokens} tokens", r), (f"{preset.serving_short_new_tokens} tokens",
                                                                     r["short"])):
            med = x["ratio_median"]
            log(f"{t}, {load}: http / engine median {med:.3f}, best-of {x['ratio_best_of']:.3f}" if med is not None
                else f"{t}, {load}: no ratio measured")
    log(f"judged ({TOPOLOGIES[0]}): target >= {TARGET}: {'met' if result['met'] else 'not met'}")
    return result


def _against_server(topology: str, preset: Preset, base_dir: Path, work: Path, fields: dict,
                    adapters: dict[str, Path], requests: list[Request], engine, threads: int) -> dict:
    """The alternated rounds against a loopback server of one topology: {server, warmup, rounds, summary...}."""
    from loadtests.http_load import LoopbackServer, register
    from serve.app.config import AppConfig

    server_log = work / "serving" / f"server-{base_dir.name}-{topology}.log"
    # Ray sets OMP_NUM_THREADS=1 in a replica that asks for no CPUs: give the server the bench's thread count.
    # The metrics push interval is the server's default (the HTTP load scenarios' loopback server pushes faster).
    push_s = AppConfig.model_fields["metrics_push_interval_s"].default
    server = LoopbackServer(preset, base_dir, work, server_log, engine=fields, env={"OMP_NUM_THREADS": str(threads)},
                            app={"topology": topology, "metrics_push_interval_s": push_s})
    short = [dataclasses.replace(r, max_new_tokens=preset.serving_short_new_tokens) for r in requests]
    try:
        register(server.url, list(adapters.items()), None)
        log(f"topology {topology}: {server.url}")
        warm, rounds = asyncio.run(alternate(engine, server.url, requests, preset.serving_rounds, server.proc.pid))
        log(f"topology {topology}, short requests ({preset.serving_short_new_tokens} new tokens):")
        short_warm, short_rounds = asyncio.run(alternate(engine, server.url, short, preset.serving_rounds,
                                                         server.proc.pid))
    finally:
        server.stop()
    return {"server": {"url": server.url, "log": str(server_log), "topology": topology},
            "warmup": warm, "rounds": rounds, **summarize(rounds),
            "short": {"new_tokens": preset.serving_short_new_tokens, "warmup": short_warm, "rounds": short_rounds,
                      **summarize(short_rounds)}}


def plot(result: dict, out: Path, preset_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    xs = [r["round"] for r in result["rounds"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(xs, result["engine_tokens_per_s_runs"], "-o", label="in-process engine (submit)")
    ax.plot(xs, result["http_tokens_per_s_runs"], "-s", label=f"HTTP POST /generate via Ray Serve, {result['topology']}")
    for topology, other in result.get("other_topologies", {}).items():
        oxs = [r["round"] for r in other["rounds"]]
        ax.plot(oxs, other["http_tokens_per_s_runs"], "--s", alpha=0.6,
                label=f"HTTP, {topology} (median ratio {other['ratio_median']:.3f})")
    ax.set_xlabel("round (engine, then http)")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_xticks(xs)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, result["ratio_runs"], ":^", color="gray", label=f"http / engine, {result['topology']}")
    ax2.axhline(TARGET, color="red", lw=0.8, ls="--", label=f"target {TARGET}")
    ax2.set_ylabel("ratio")
    ax2.set_ylim(0, max(1.1, *(result["ratio_runs"] or [1.0])) * 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    med = result["ratio_median"]
    ax.set_title(f"serving-layer cost — {preset_name}: {result['concurrency']} concurrent x "
                 f"{result['new_tokens']} tokens; {result['topology']} median ratio {med:.3f}" if med is not None else
                 f"serving-layer cost — {preset_name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_lines(s: dict) -> list[str]:
    def f(v):
        return "-" if v is None else f"{v:.3g}"

    lines = ["", "## Serving-layer cost (HTTP through Ray Serve / in-process engine)", "",
             f"{s['concurrency']} concurrent requests x {s['new_tokens']} new tokens ({s['input_tokens']} input "
             f"tokens; {s['rows']['base']} base rows, {s['rows']['adapter']} rows over {len(s['adapters']) - 1} "
             f"adapters, two per kind), the same engine config on both sides, rounds alternated "
             f"({s['order']}) after one warm-up pair; client: {s.get('client', 'httpx')}. Topology "
             f"`{s.get('topology', 'split')}`: median paired ratio **{f(s['ratio_median'])}**, best-of "
             f"{f(s['ratio_best_of'])}; target >= {s['target']:g}: {'met' if s['met'] else 'not met'}."]
    for topology, o in [(s.get("topology", "split"), s), *(s.get("other_topologies") or {}).items()]:
        if o is not s:
            lines.append(f"Topology `{topology}`, against the same in-process engine: median paired ratio "
                         f"{f(o['ratio_median'])}, best-of {f(o['ratio_best_of'])} (rounds "
                         f"{', '.join(f(r) for r in o['ratio_runs'])}).")
        if o.get("short"):
            x = o["short"]
            lines.append(f"Short requests ({x['new_tokens']} new tokens, the same texts; the per-request cost "
                         f"dominates), topology `{topology}`: median paired ratio {f(x['ratio_median'])} (rounds "
                         f"{', '.join(f(r) for r in x['ratio_runs'])}).")
    lines += ["", "| round | engine tok/s | http tok/s | http / engine | http statuses | complete (engine / http) |",
              "|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        e, h = r["engine"], r["http"]
        lines.append(f"| {r['round']} | {e['tokens_per_s']:.1f} | {h['tokens_per_s']:.1f} | {f(r['ratio'])} | "
                     f"{', '.join(f'{k}: {v}' for k, v in h['statuses'].items())} | "
                     f"{e['complete']}/{e['requests']} / {h['complete']}/{h['requests']} |")
    shares = s.get("http_cpu_by_process") or {}
    if shares:
        lines += ["", f"CPU used during an HTTP round ({s.get('topology', 'split')}), by process (median over rounds; "
                      "share of wall time x cores):", "",
                  "| process | CPU s | share |", "|---|---|---|"]
        for role, v in sorted(shares.items(), key=lambda kv: -kv[1]["cpu_s_median"]):
            lines.append(f"| {role} | {v['cpu_s_median']:.3f} | {v['share_median']:.1%} |")
    return lines

