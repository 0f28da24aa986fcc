"""Decoding breadth (issue 24): what per-row logits processing, grammars and beam search cost in the batch.

One engine, one batch shape (ROWS rows, NEW_TOKENS new tokens, greedy, the bench base whose EOS row is zeroed so
every row runs to the end), cells run once per round in rotated order, max(preset.repeats, MIN_ROUNDS) rounds after a warm-up:
- plain: ROWS greedy rows;
- penalties: the same rows, each with repetition_penalty, frequency_penalty, presence_penalty and
  no_repeat_ngram_size (every per-row processor that keeps state);
- grammar: the same rows, each constrained by a JSON schema (llguidance masks, computed beside the model step);
- beams: BEAM_REQUESTS requests with num_beams=BEAMS (the same ROWS rows), next to the ROWS greedy rows.
Targets: penalties / plain >= 0.9 and grammar / plain >= 0.9 (tokens per second, best round / best round; the
paired per-round median is reported too). Beams: reported (the beam step's selection and KV reordering per step
against greedy rows; returned tokens are a quarter of the row-steps).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from loadtests.presets import Preset

TARGET = 0.9
ROWS = 32
NEW_TOKENS = 32
BEAMS = 4
BEAM_REQUESTS = ROWS // BEAMS
MIN_ROUNDS = 8  # a shared machine is noisy: paired per-round ratios need a few rounds
PENALTIES = {"repetition_penalty": 1.2, "frequency_penalty": 0.3, "presence_penalty": 0.3, "no_repeat_ngram_size": 3}
SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["summary", "tags"], "additionalProperties": False}


def log(msg: str) -> None:
    print(f"[bench decoding {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _requests(texts: list[str], cell: str):
    from serve.engine import GenerationParams, GenerationRequest

    if cell == "beams":
        return [GenerationRequest(t, params=GenerationParams(max_new_tokens=NEW_TOKENS, num_beams=BEAMS))
                for t in texts[:BEAM_REQUESTS]]
    extra = {"penalties": PENALTIES, "grammar": {"grammar": {"type": "json", "value": SCHEMA}}}.get(cell, {})
    return [GenerationRequest(t, params=GenerationParams(max_new_tokens=NEW_TOKENS, **extra)) for t in texts]


def _run(engine, texts: list[str], cell: str) -> dict:
    reqs = _requests(texts, cell)
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    dt = time.perf_counter() - t0
    returned = sum(r.generated_tokens for r in results)
    row_steps = returned * (BEAMS if cell == "beams" else 1)
    return {"seconds": dt, "returned_tokens": returned, "row_steps": row_steps}


def decoding(preset: Preset, base_dir: Path, work: Path, out_dir: Path) -> dict:
    from loadtests.engine_driver import close_engine, open_engine
    from loadtests.workload import random_texts

    texts = random_texts(ROWS, preset.input_chars, preset.seed)
    cells = ("plain", "penalties", "grammar", "beams")
    engine = open_engine(base_dir, preset, max_batch_rows=ROWS, max_new_tokens_cap=NEW_TOKENS, max_beams=BEAMS)
    runs: dict[str, list[dict]] = {c: [] for c in cells}
    rounds = max(preset.repeats, MIN_ROUNDS)
    try:
        for c in cells:  # warm-up: kernels, llguidance's tokenizer, the grammar's first compile
            _run(engine, texts, c)
        for r in range(rounds):
            order = cells[r % len(cells):] + cells[:r % len(cells)]  # each cell first as often as the others
            for c in order:
                runs[c].append(_run(engine, texts, c))
            log(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{c} {runs[c][-1]['row_steps'] / runs[c][-1]['seconds']:.0f} row-tok/s" for c in cells))
    finally:
        close_engine(engine)
    out = {"rows": ROWS, "new_tokens": NEW_TOKENS, "input_tokens": preset.input_chars, "repeats": rounds,
           "penalties": PENALTIES, "schema": SCHEMA, "beams": BEAMS, "beam_requests": BEAM_REQUESTS, "cells": {}}
    for c in cells:
        rates = [x["row_steps"] / x["seconds"] for x in runs[c]]
        out["cells"][c] = {"row_tokens_per_s": max(rates), "row_tokens_per_s_runs": rates,
                           "returned_tokens_per_s": max(x["returned_tokens"] / x["seconds"] for x in runs[c]),
                           "seconds_best": min(x["seconds"] for x in runs[c]),
                           "returned_tokens": runs[c][0]["returned_tokens"], "row_steps": runs[c][0]["row_steps"]}
    plain = out["cells"]["plain"]
    for c in ("penalties", "grammar"):
        cell = out["cells"][c]
        paired = [a / b for a, b in zip(cell["row_tokens_per_s_runs"], plain["row_tokens_per_s_runs"], strict=True)]
        ratio = cell["row_tokens_per_s"] / plain["row_tokens_per_s"]
        out[f"{c}_vs_plain"] = {"measured": ratio, "ratio_runs": paired, "ratio_median_paired": statistics.median(paired),
                                "target": TARGET, "criterion": f">= {TARGET}", "met": ratio >= TARGET}
        log(f"{c} / plain ({ROWS} rows): {ratio:.3f} (paired median {statistics.median(paired):.3f}); "
            f"target >= {TARGET}: {'met' if ratio >= TARGET else 'not met'}")
    beams = out["cells"]["beams"]
    out["beams_vs_greedy"] = {"seconds_ratio": beams["seconds_best"] / plain["seconds_best"],
                              "row_steps_ratio": beams["row_tokens_per_s"] / plain["row_tokens_per_s"],
                              "returned_tokens_ratio": beams["returned_tokens_per_s"] / plain["returned_tokens_per_s"]}
    b = out["beams_vs_greedy"]
    log(f"beam search {BEAMS} x {BEAM_REQUESTS} requests vs {ROWS} greedy rows: {b['seconds_ratio']:.2f}x the time, "
        f"row-steps/s {b['row_steps_ratio']:.3f}x")
    out["plot"] = str(plot(out, out_dir / "decoding.png", preset.name))
    return out


def plot(result: dict, out: Path, preset_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    cells = result["cells"]
    names = list(cells)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(range(len(names)), [cells[c]["row_tokens_per_s"] for c in names],
                  color=["gray", "tab:blue", "tab:orange", "tab:green"])
    for bar, c in zip(bars, names, strict=True):
        ax.annotate(f"{cells[c]['row_tokens_per_s']:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    labels = {"plain": f"{result['rows']} greedy rows", "penalties": "+ penalties, n-gram ban",
              "grammar": "+ JSON schema grammar", "beams": f"{result['beam_requests']} x beam {result['beams']}"}
    ax.set_xticks(range(len(names)), [labels[c] for c in names], fontsize=8)
    ax.set_ylabel("row tokens / s (best round)")
    ax.set_title(f"penalties / plain {result['penalties_vs_plain']['measured']:.2f}, grammar / plain "
                 f"{result['grammar_vs_plain']['measured']:.2f} (target >= {TARGET}); beams "
                 f"{result['beams_vs_greedy']['seconds_ratio']:.2f}x the greedy time", fontsize=9)
    fig.suptitle(f"Decoding breadth per row — {preset_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_lines(s: dict) -> list[str]:
    lines = ["", "## Decoding breadth per row (issue 24)", "",
             f"{s['rows']} rows, {s['input_tokens']} input tokens, {s['new_tokens']} new tokens, greedy; best of "
             f"{s['repeats']} alternated rounds. Penalties: {s['penalties']}. Grammar: a JSON schema (object with a "
             f"string and an array of strings). Beams: {s['beam_requests']} requests x num_beams={s['beams']}.", "",
             "| cell | row tokens/s | returned tokens/s | best round, s |", "|---|---|---|---|"]
    for name, c in s["cells"].items():
        lines.append(f"| {name} | {c['row_tokens_per_s']:.1f} | {c['returned_tokens_per_s']:.1f} | "
                     f"{c['seconds_best']:.3f} |")
    for c in ("penalties", "grammar"):
        t = s[f"{c}_vs_plain"]
        lines.append(f"\n{c} / plain: {t['measured']:.3f} (paired median {t['ratio_median_paired']:.3f}); target "
                     f"{t['criterion']}: {'met' if t['met'] else 'not met'}.")
    b = s["beams_vs_greedy"]
    lines.append(f"\nBeam search: {b['seconds_ratio']:.2f}x the time of {s['rows']} greedy rows "
                 f"(row-steps/s {b['row_steps_ratio']:.3f}x; returned tokens/s {b['returned_tokens_ratio']:.3f}x).")
    return lines
