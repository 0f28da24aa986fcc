"""`peftserve bench`: the engine and its peers side by side, one process, same base, adapters and inputs.

Sections (each can be selected with --only; a failing section is recorded, not fatal):
- throughput: N distinct adapters per batch (per kind, and four kinds mixed) on the engine; peft mixed
  batch, swap per request and merged-per-adapter on LoRA; the engine's base and HF generate as bases.
- swap: cold (disk -> servable), warm (host -> device), hot, and register -> first token.
- batching: continuous batching vs classic static batching (HF generate, finished rows padded until the
  batch's longest ends) and vs the engine's compacting static mode, Poisson arrivals, output lengths 4-64.
- idle: memory of registered, never-used adapters.
- serving: HTTP through Ray Serve (a loopback server) / the in-process engine, same config and load, rounds
  alternated (loadtests/serving_overhead.py).
- methods: DoRA and AdaLoRA next to LoRA, P-tuning next to prompt tuning, 32 distinct adapters each, one
  engine, rounds alternated (loadtests/methods.py).
- combinations: a weighted LoRA pair per row next to one LoRA per row; a ties combination's first request
  against a warm one (loadtests/combinations.py).
- decoding: every row with penalties, or with a JSON grammar, against the same batch plain; beam search 4 on 8
  requests against 32 greedy rows (loadtests/decoding.py).

A run of some sections (--only) into a directory that holds an earlier results.json of the same preset
keeps that file's other sections (named under `kept_from_earlier`), so one section can be re-measured
without losing the rest.
"""

from __future__ import annotations

import datetime
import json
import random
import statistics
import time
import traceback
from pathlib import Path

from loadtests import report
from loadtests.measure import distribution, machine, quiet_libraries, result_cell, timed_cell
from loadtests.presets import KINDS, SECTIONS, Preset
from loadtests.workload import ensure_base, make_adapters, make_requests, random_texts

# section -> its key in results.json
RESULT_KEYS = {"throughput": "throughput", "swap": "swap", "batching": "batching", "idle": "idle_adapters",
               "serving": "serving", "methods": "methods", "combinations": "combinations", "runtime": "runtime",
               "decoding": "decoding"}
OFFERED_LOAD = 3.0  # batching section: Poisson rate / estimated capacity


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mixed_names(by_kind: dict[str, list[str]], n: int) -> list[str]:
    """n distinct adapters interleaving the four kinds: lora-0, ia3-0, bitfit-0, prompt-0, lora-1, ..."""
    out = [by_kind[k][i] for i in range(n) for k in KINDS if i < len(by_kind[k])]
    return out[:n]


def throughput(preset: Preset, base_dir: Path, paths: dict[str, dict[str, Path]], torch_dtype) -> list[dict]:
    from loadtests.engine_driver import EnginePeer, close_engine, engine_rounds, open_engine, slots_for
    from loadtests.peers import (
        HFBasePeer,
        MergedPerAdapterPeer,
        PeftAdapters,
        PeftMixedPeer,
        SwapPerRequestPeer,
    )

    top = max(preset.distinct)
    row_sizes = sorted({max(preset.batch_rows, n) for n in preset.distinct})
    texts = random_texts(max(row_sizes), preset.input_chars, preset.seed)
    by_kind = {k: list(paths[k]) for k in KINDS}
    all_paths = {name: p for k in KINDS for name, p in paths[k].items()}
    engine = open_engine(base_dir, preset, device_slots=slots_for(top), max_batch_rows=max(row_sizes),
                         host_bytes=8 * 2**30)
    try:
        peer = EnginePeer(engine)
        peer.register(all_paths)
        cells = engine_rounds(peer, engine_plan(preset, texts, by_kind, row_sizes), preset)
    finally:
        close_engine(engine)
    base_of = {c["rows"]: c["tokens_per_s"] for c in cells if c["kind"] == "base"}

    hf = HFBasePeer(base_dir, preset.device, torch_dtype)
    for rows in row_sizes:
        reqs = make_requests(texts[:rows], [None], preset.new_tokens)
        stats = timed_cell(lambda r=reqs, p=hf: p.run(r), preset.peer_repeats)
        for n in (n for n in preset.distinct if max(preset.batch_rows, n) == rows):
            cells.append(result_cell(hf.name, "base", n, rows, stats, hf.memory_bytes()))
        log(f"hf generate base, {rows} rows: {stats['tokens_per_s']:.1f} tok/s")
    del hf

    lora = dict(list(paths["lora"].items())[:max(preset.peer_distinct)])
    shared = PeftAdapters(base_dir, lora, preset.device, torch_dtype)
    merged = MergedPerAdapterPeer(base_dir, lora, preset.device, torch_dtype, preset.max_materialized)
    base_bytes, per_adapter = shared.base_bytes, shared.adapter_bytes
    for n in preset.peer_distinct:
        rows = max(preset.batch_rows, n)
        reqs = make_requests(texts[:rows], list(lora)[:n], preset.new_tokens)
        for peer in (PeftMixedPeer(shared), SwapPerRequestPeer(shared), merged):
            stats = timed_cell(lambda r=reqs, p=peer: p.run(r), preset.peer_repeats)
            mem, projected = ((merged.memory_bytes(n), n > len(merged.models)) if peer is merged
                              else (base_bytes + n * per_adapter, False))
            cells.append(result_cell(peer.name, "lora", n, rows, stats, mem, projected))
            log(f"{peer.name} N={n}: {stats['tokens_per_s']:.1f} tok/s")
    for c in cells:
        if c["peer"] != "engine":  # engine cells carry ratios paired within each round
            c["ratio_to_base"] = c["tokens_per_s"] / base_of[c["rows"]] if base_of.get(c["rows"]) else None
    return cells


def engine_plan(preset: Preset, texts: list[str], by_kind: dict[str, list[str]], row_sizes: list[int]) -> list:
    """(kind, N, rows, requests) for every engine cell; base cells first at each row count."""
    plan = []
    for rows in row_sizes:
        ns = [n for n in preset.distinct if max(preset.batch_rows, n) == rows]
        plan += [("base", n, rows, make_requests(texts[:rows], [None], preset.new_tokens)) for n in ns[:1]]
        for kind in (*KINDS, "mixed"):
            if rows > preset.batch_rows and kind not in preset.wide_kinds:
                continue
            for n in ns:
                names = mixed_names(by_kind, n) if kind == "mixed" else by_kind[kind][:n]
                plan.append((kind, n, rows, make_requests(texts[:rows], names, preset.new_tokens)))
    return plan


def swap(preset: Preset, base_dir: Path, paths: dict[str, dict[str, Path]]) -> dict:
    from loadtests.engine_driver import close_engine, first_token_after_register, open_engine, swap_latencies
    from serve.engine.observer import RecordingObserver

    recorder = RecordingObserver()
    lora = dict(list(paths["swap"].items())[:preset.swap_samples])
    # fewer LoRA slots than adapters (so pass 2 finds each evicted from the device), host room for all
    engine = open_engine(base_dir, preset, observer=recorder, max_batch_rows=4, host_bytes=8 * 2**30,
                         device_slots={"lora": 4, "ia3": 1, "bitfit": 1, "prompt": 1})
    try:
        probe = random_texts(1, preset.input_chars, preset.seed + 7)[0]
        tiers = swap_latencies(engine, recorder, lora, probe)
        ft = first_token_after_register(engine, next(iter(lora.values())), preset.first_token_samples, probe,
                                        "fresh")
    finally:
        close_engine(engine)
    out = {tier: distribution(v) for tier, v in tiers.items()}
    out.update({k: distribution(v) for k, v in ft.items()})
    log("swap p99 ms: " + ", ".join(f"{k} {1000 * (d['p99'] or 0):.2f}" for k, d in out.items()))
    return out


def batching(preset: Preset, base_dir: Path, paths: dict[str, dict[str, Path]], capacity_tps: float | None) -> dict:
    from loadtests.engine_driver import close_engine, open_engine, run_arrivals

    rng = random.Random(preset.seed + 11)
    n = preset.poisson_requests
    lo, hi = preset.out_len
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    names = [None, *list(paths["lora"])[:7]]
    texts = random_texts(n, preset.input_chars, preset.seed + 13)
    from loadtests.workload import Request

    # The policies are compared on the same work: base rows everywhere (classic static runs HF generate,
    # which cannot mix adapters per row). One more continuous run serves the same arrivals with 7 of every
    # 8 requests on LoRA adapters: what adapters cost on top of the policy.
    requests = [Request(texts[i], None, lengths[i]) for i in range(n)]
    with_lora = [Request(texts[i], names[i % len(names)], lengths[i]) for i in range(n)]
    # Offered load 3x the capacity estimated from the throughput section. That estimate comes from a
    # prefill-heavy workload (8 new tokens), so it understates a decode-heavy one (4-64 tokens); 3x makes
    # sure the server, not the arrival process, is the bottleneck: only then does tokens/s compare the
    # batching policies (an unsaturated server serves every policy at the arrival rate).
    rate = OFFERED_LOAD * capacity_tps / statistics.fmean(lengths) if capacity_tps else preset.poisson_rate
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    out = {"rate_per_s": rate, "offered_load_x": OFFERED_LOAD if capacity_tps else None, "requests": n,
           "out_len": [lo, hi]}
    for mode, reqs in (("continuous", requests), ("static", requests), ("continuous_lora", with_lora)):
        engine = open_engine(base_dir, preset, scheduling=mode.removesuffix("_lora"),
                             max_batch_rows=preset.max_batch_rows,
                             device_slots={"lora": 8, "ia3": 1, "bitfit": 1, "prompt": 1})
        try:
            for name in names[1:]:
                engine.register_adapter(name, str(paths["lora"][name]))
            run_arrivals(engine, with_lora[: len(names)], [0.0] * len(names))  # warm: adapters resident
            stats = run_arrivals(engine, reqs, arrivals)
        finally:
            close_engine(engine)
        out[mode] = stats
        log(f"{mode} batching: {stats['tokens_per_s']:.1f} tok/s, p50 latency {stats['p50_latency_s']:.2f} s")
    import torch

    from loadtests.classic_static import run_classic_static

    stats = run_classic_static(base_dir, preset.device, getattr(torch, preset.dtype), requests, arrivals,
                               preset.max_batch_rows)
    out["classic_static"] = stats
    log(f"classic static batching (HF generate): {stats['tokens_per_s']:.1f} tok/s, "
        f"p50 latency {stats['p50_latency_s']:.2f} s, {stats['batches']} batches")
    return out


def idle(preset: Preset, base_dir: Path, paths: dict[str, dict[str, Path]]) -> dict:
    from loadtests.engine_driver import close_engine, idle_registration_bytes, open_engine

    engine = open_engine(base_dir, preset, device_slots={"lora": 1, "ia3": 1, "bitfit": 1, "prompt": 1})
    try:
        out = idle_registration_bytes(engine, next(iter(paths["lora"].values())), preset.idle_adapters)
    finally:
        close_engine(engine)
    log(f"idle adapters: {out['bytes_each']:.0f} bytes each (heap), {out['rss_bytes_each']:.0f} (RSS)")
    return out


def run(preset: Preset, out: Path, work: Path, command: str, sections: tuple[str, ...] = SECTIONS) -> dict:
    import torch

    quiet_libraries()
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchUnavailableError(f"preset {preset.name} needs a CUDA device and none is available here")
    torch.manual_seed(preset.seed)
    t0 = time.time()
    results: dict = {"preset": preset.to_dict(), "machine": machine(), "command": command,
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "skipped": [], "note": "Other processes shared this machine's cores: expect noise; "
                                            "ratios are measured within one run."}
    from serve.engine.threads import run_on_fresh_thread

    # building the base runs torch kernels: on a thread that exits, so this thread never holds an OpenMP team
    # beside the engines' loop threads (serve/engine/threads.py)
    base_dir = run_on_fresh_thread(ensure_base, work, preset.base_preset, preset.seed)
    results["decode_bytes"] = _decode_bytes(preset, base_dir)
    # the serving section alone needs two adapters per kind, not the sweep's hundreds; the methods section
    # writes (or finds cached) its own
    others = set(sections) - {"methods", "combinations", "runtime", "decoding"}
    paths = adapters_for(preset, base_dir, work, top=2 if others == {"serving"} else None) if others else {}
    torch_dtype = getattr(torch, preset.dtype)
    capacity = None
    for section in sections:
        log(f"section {section}")
        try:
            if section == "throughput":
                results["throughput"] = {"cells": throughput(preset, base_dir, paths, torch_dtype)}
                base = [c for c in results["throughput"]["cells"] if c["peer"] == "engine" and c["kind"] == "base"]
                capacity = base[0]["tokens_per_s"] * min(1.0, preset.max_batch_rows / base[0]["rows"]) if base else None
            elif section == "swap":
                results["swap"] = swap(preset, base_dir, paths)
            elif section == "batching":
                results["batching"] = batching(preset, base_dir, paths, capacity)
            elif section == "idle":
                results["idle_adapters"] = idle(preset, base_dir, paths)
            elif section == "serving":
                from loadtests.serving_overhead import serving

                results["serving"] = serving(preset, base_dir, work, paths, out)
            elif section == "methods":
                from loadtests.methods import methods

                results["methods"] = methods(preset, base_dir, work, out)
            elif section == "combinations":
                from loadtests.combinations import combinations

                results["combinations"] = combinations(preset, base_dir, work, out)
            elif section == "runtime":
                from loadtests.runtime import runtime

                results["runtime"] = runtime(preset, base_dir, work, out)
            elif section == "decoding":
                from loadtests.decoding import decoding

                results["decoding"] = decoding(preset, base_dir, work, out)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' numbers
            traceback.print_exc()
            results["skipped"].append({"what": section, "why": f"{type(e).__name__}: {e}"})
    results["duration_s"] = time.time() - t0
    if set(sections) != set(SECTIONS):
        keep_earlier(results, out / "results.json", sections)
    report.write(results, out)
    report.print_targets(results)
    return results


def keep_earlier(results: dict, earlier_file: Path, sections: tuple[str, ...]) -> None:
    """Copy the sections this run did not measure from an earlier results.json of the same preset."""
    if not earlier_file.exists():
        return
    try:
        earlier = json.loads(earlier_file.read_text())
    except (OSError, ValueError) as e:
        log(f"not keeping {earlier_file}: unreadable ({e})")
        return
    if earlier.get("preset", {}).get("name") != results["preset"]["name"]:
        return
    kept = [s for s in SECTIONS if s not in sections and RESULT_KEYS[s] in earlier]
    for s in kept:
        results[RESULT_KEYS[s]] = earlier[RESULT_KEYS[s]]
    results["skipped"] += [x for x in earlier.get("skipped", []) if x.get("what") in SECTIONS
                           and x["what"] not in sections]
    if kept:
        prior = earlier.get("kept_from_earlier", {}).get("runs", {})
        runs = {s: prior.get(s, {"command": earlier.get("command"), "started": earlier.get("started"),
                                 "machine": (earlier.get("machine") or {}).get("cpu")})
                for s in kept}
        results["kept_from_earlier"] = {"sections": kept, "runs": runs}
        log(f"kept sections {', '.join(kept)} from {earlier_file}")


def _decode_bytes(preset: Preset, base_dir: Path) -> dict:
    import torch
    from transformers import AutoConfig

    from loadtests.adapter_math import decode_step_bytes

    size = torch.finfo(getattr(torch, preset.dtype)).bits // 8
    return decode_step_bytes(AutoConfig.from_pretrained(base_dir), max(preset.distinct), preset.lora_rank, size)


def adapters_for(preset: Preset, base_dir: Path, work: Path, top: int | None = None) -> dict[str, dict[str, Path]]:
    """{kind: {name: path}} with max(N) adapters per kind (or `top`: then 'swap' holds as many), plus
    'swap': LoRA adapters for the swap tiers."""
    root = work / "adapters" / base_dir.name
    swap_samples = preset.swap_samples if top is None else top
    top = max(*preset.distinct, *preset.peer_distinct) if top is None else top
    out = {}
    for kind in KINDS:
        count = max(top, swap_samples) if kind == "lora" else top
        ps = make_adapters(base_dir, root, kind, count, preset.lora_rank, preset.prompt_tokens, preset.seed,
                           progress=log)
        out[kind] = {p.name: p for p in ps[:top]}
        if kind == "lora":
            out["swap"] = {f"swap-{p.name}": p for p in ps[:swap_samples]}
    return out


class BenchUnavailableError(RuntimeError):
    """The preset cannot run on this machine (e.g. gpu-xl without CUDA)."""
