"""Several adapters on one row (issue 15): what a weighted LoRA pair costs next to one LoRA, and what the first
request of a `ties` combination pays for its build.

One engine holds 2N LoRAs (N = 32 distinct, or the preset's largest N): the cells base, lora (N rows' worth of
distinct single LoRAs) and lora_pair (each row a weighted pair of two distinct LoRAs, `linear`: both deltas in
the same batched matmuls) run once per round, `repeats` rounds (`engine_driver.engine_rounds`). Target: lora_pair /
lora >= 0.8 (best / best). The ties part times, for `ties_samples` distinct pairs, the first request (cold: the
derived LoRA is built on a loader thread with PEFT's merge functions, then copied into a slot) against the same
request again (warm), one row each. Reported, never asserted.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from loadtests.presets import Preset

TARGET = 0.8
TIES_SAMPLES = 5


def log(msg: str) -> None:
    print(f"[bench combinations {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def combinations(preset: Preset, base_dir: Path, work: Path, out_dir: Path) -> dict:
    from loadtests.engine_driver import EnginePeer, close_engine, engine_rounds, open_engine
    from loadtests.methods import methods_n
    from loadtests.workload import Request, make_adapters, make_requests, random_texts

    top = methods_n(preset)
    rows = max(preset.batch_rows, top)
    root = work / "adapters" / base_dir.name
    paths = make_adapters(base_dir, root, "lora", 2 * top, preset.lora_rank, preset.prompt_tokens, preset.seed,
                          progress=log)[:2 * top]
    names = [p.name for p in paths]
    texts = random_texts(rows, preset.input_chars, preset.seed)
    pairs = [((names[2 * i], names[2 * i + 1]), (0.6, 0.4)) for i in range(top)]
    plan = [("base", top, rows, make_requests(texts, [None], preset.new_tokens)),
            ("lora", top, rows, make_requests(texts, names[:top], preset.new_tokens)),
            ("lora_pair", top, rows, [Request(t, None, preset.new_tokens, (list(ids), list(w), "linear"))
                                      for t, (ids, w) in zip(texts, [pairs[i % top] for i in range(rows)],
                                                             strict=True)])]
    slots = {"lora": 2 * top + TIES_SAMPLES, "ia3": 1, "bitfit": 1, "prompt": 1}
    engine = open_engine(base_dir, preset, device_slots=slots, max_batch_rows=rows, host_bytes=8 * 2**30,
                         max_derived_adapters=TIES_SAMPLES)
    try:
        for p in paths:
            engine.register_adapter(p.name, str(p))
        peer = EnginePeer(engine)
        cells = engine_rounds(peer, plan, preset.with_overrides(distinct=(top,)))
        ties = _ties_cost(peer, names, texts[0], preset.new_tokens)
    finally:
        close_engine(engine)
    by = {c["kind"]: c for c in cells}
    ratio = by["lora_pair"]["tokens_per_s"] / by["lora"]["tokens_per_s"]
    paired = [a / b for a, b in zip(by["lora_pair"]["tokens_per_s_runs"], by["lora"]["tokens_per_s_runs"], strict=True)]
    result = {"distinct": top, "rows": rows, "lora_rank": preset.lora_rank, "input_tokens": preset.input_chars,
              "new_tokens": preset.new_tokens, "repeats": preset.repeats, "device_slots": slots, "cells": cells,
              "pair_vs_single": {"measured": ratio, "ratio_runs": paired, "ratio_median_paired": statistics.median(paired),
                                 "target": TARGET, "criterion": f">= {TARGET}", "met": ratio >= TARGET},
              "ties": ties}
    result["plot"] = str(plot(result, out_dir / "combinations.png", preset.name))
    log(f"weighted LoRA pair / one LoRA ({top} rows): {ratio:.3f} (paired median {statistics.median(paired):.3f}); "
        f"target >= {TARGET}: {'met' if ratio >= TARGET else 'not met'}")
    log(f"ties first request {ties['cold_s_median'] * 1e3:.1f} ms vs warm {ties['warm_s_median'] * 1e3:.1f} ms "
        f"({ties['cold_over_warm']:.1f}x)")
    return result


def _ties_cost(peer, names: list[str], text: str, new_tokens: int) -> dict:
    """Per distinct pair: the first request (the build included) and the same request warm, one row each."""
    from loadtests.workload import Request

    cold, warm = [], []
    for i in range(TIES_SAMPLES):
        req = Request(text, None, new_tokens, ([names[i], names[-1 - i]], [0.7, 0.3], "ties", 0.5))
        cold.append(peer.run([req]).seconds)
        warm.append(min(peer.run([req]).seconds for _ in range(3)))
    cm, wm = statistics.median(cold), statistics.median(warm)
    return {"samples": TIES_SAMPLES, "density": 0.5, "cold_s": cold, "warm_s": warm, "cold_s_median": cm,
            "warm_s_median": wm, "cold_over_warm": cm / wm, "build_extra_s": cm - wm}


def plot(result: dict, out: Path, preset_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    cells, ties = result["cells"], result["ties"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = {"base": "engine base", "lora": "one LoRA / row", "lora_pair": "weighted LoRA pair / row"}
    bars = ax.bar(range(len(cells)), [c["tokens_per_s"] for c in cells], color=["gray", "tab:blue", "tab:orange"])
    for bar, c in zip(bars, cells, strict=True):
        ax.annotate(f"{c['tokens_per_s']:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cells)), [labels[c["kind"]] for c in cells], fontsize=8)
    ax.set_ylabel("generated tokens / s (best round)")
    ax.set_title(f"{result['rows']} rows, {result['distinct']} distinct: pair / one = "
                 f"{result['pair_vs_single']['measured']:.2f} (target >= {TARGET})", fontsize=9)
    bx.bar([0, 1], [ties["cold_s_median"] * 1e3, ties["warm_s_median"] * 1e3], color=["tab:red", "tab:green"])
    bx.set_xticks([0, 1], ["ties: first request", "ties: warm"], fontsize=8)
    bx.set_ylabel("one request, ms (median of distinct pairs)")
    bx.set_title(f"first / warm = {ties['cold_over_warm']:.1f}x", fontsize=9)
    fig.suptitle(f"Several adapters on one row — {preset_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_lines(s: dict) -> list[str]:
    t, ties = s["pair_vs_single"], s["ties"]
    lines = ["", "## Several adapters on one row (issue 15)", "",
             f"{s['rows']} rows, {s['distinct']} distinct LoRAs (r={s['lora_rank']} on every linear) or {s['distinct']} "
             f"distinct weighted pairs (0.6/0.4, linear), {s['input_tokens']} input tokens, {s['new_tokens']} new tokens, "
             f"greedy; best of {s['repeats']} rounds.", "",
             "| cell | tokens/s | ratio to base |", "|---|---|---|"]
    for c in s["cells"]:
        lines.append(f"| {c['kind']} | {c['tokens_per_s']:.1f} | {c['ratio_to_base']:.3f} |")
    lines += ["", f"Weighted pair / one LoRA: {t['measured']:.3f} (paired median {t['ratio_median_paired']:.3f}); "
                  f"target {t['criterion']}: {'met' if t['met'] else 'not met'}.",
              f"ties (density {ties['density']}): first request {ties['cold_s_median'] * 1e3:.1f} ms, warm "
              f"{ties['warm_s_median'] * 1e3:.1f} ms ({ties['cold_over_warm']:.1f}x; the build adds "
              f"{ties['build_extra_s'] * 1e3:.1f} ms), median over {ties['samples']} distinct pairs."]
    return lines
