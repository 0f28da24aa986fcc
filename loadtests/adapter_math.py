"""Cost of the per-row adapter math relative to the bare base, at batch 32 with 32 distinct adapters.

    python -m loadtests.adapter_math                    # flan-t5-small shape (d_model 512, d_ff 1024)
    python -m loadtests.adapter_math --preset tiny      # seconds; the test suite runs this

Two levels, each timed against a baseline measured in the same run:
  layer  one wrapped linear (q: d->d, wi_0: d->ff, wo: ff->d) in an encoder pass (T tokens per row) and a
         decode step (1 token per row): base nn.Linear vs each kind, LoRA with and without the gathered cache.
  model  a whole decoder step with KV cache (every T5 linear adapted) and an encoder pass with soft prompts.
Writes loadtests/results/adapter_math-<preset>.json and .png; prints a table. No pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from adapters import (
    AdapterKind,
    AdapterSpec,
    BaseDescription,
    BitFitWeights,
    IA3Weights,
    LoraWeights,
    PromptWeights,
    RowAdapters,
    SlotConfig,
    attach_slots,
)

PRESETS = {
    "flan-t5-small": dict(base="flan-t5-small", batch=32, rank=8, enc_len=64, virtual_tokens=16, repeats=30,
                          layers=("q", "wi_0", "wo")),
    "tiny": dict(base="tiny", batch=4, rank=4, enc_len=8, virtual_tokens=4, repeats=2, layers=("q",)),
}
KINDS = (AdapterKind.LORA, AdapterKind.IA3, AdapterKind.BITFIT)
# model-level cases: "lora" adapts every linear (harsh), "lora q,v" the common recipe
MODEL_CASES = (AdapterKind.LORA, "lora q,v", AdapterKind.IA3, AdapterKind.BITFIT, AdapterKind.PROMPT, "mixed")


def decode_step_bytes(config, distinct: int, rank: int, element_size: int) -> dict:
    """Weight bytes one decoder step must read: the base's decoder linears and LM head, and the A/B of
    `distinct` LoRA adapters of rank `rank` on every decoder linear (the per-row path reads one copy per
    row; rows sharing an adapter are grouped and read it once). Cross-attention K/V come from the prefill,
    so only q and o of the cross-attention run per step. Bounds the LoRA / base ratio where a step is
    memory bound: adapters cannot cost less than their bytes."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    gated = str(config.feed_forward_proj).startswith("gated")
    linears = [(d, inner)] * 3 + [(inner, d)] + [(d, inner), (inner, d)]  # self q,k,v,o; cross q,o
    linears += [(d, ff)] * (2 if gated else 1) + [(ff, d)]
    layers = config.num_decoder_layers
    base = (layers * sum(i * o for i, o in linears) + config.vocab_size * d) * element_size
    lora = distinct * layers * sum(rank * (i + o) for i, o in linears) * element_size
    return {"base_bytes": base, "lora_bytes": lora, "distinct": distinct, "rank": rank,
            "lora_over_base": lora / base}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(base_fn, fn, repeats: int) -> dict:
    """Time `fn` against `base_fn` interleaved (base, fn, base, fn...) so load changes on a shared machine
    hit both alike. `ratio` = median(fn) / median(base); `ratio_min` uses the least-disturbed runs."""
    base_fn(), fn()  # warm-up (and the first gather)
    pairs = [(_time(base_fn), _time(fn)) for _ in range(repeats)]
    base, other = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"base_s": statistics.median(base), "s": statistics.median(other),
            "ratio": statistics.median(other) / statistics.median(base), "ratio_min": min(other) / min(base)}


def _spec(kind: AdapterKind, i: int, modules, rank=None, vt=None) -> AdapterSpec:
    return AdapterSpec(name=f"{kind}-{i}", kind=kind, rank=rank, targets=(), num_virtual_tokens=vt, size_bytes=0,
                       base_model=None, path="", modules=tuple(modules))


def random_weights(kind: AdapterKind, i: int, desc: BaseDescription, rank: int, vt: int, g: torch.Generator,
                   targets: tuple[str, ...] | None = None):
    """A random adapter of `kind`; LoRA and BitFit over every target linear (the harshest case) unless
    `targets` names the short module names to adapt."""
    shapes = {p: s for p, s in desc.linear_shapes.items() if targets is None or p.rsplit(".", 1)[-1] in targets}
    if kind == AdapterKind.LORA:
        a = {p: torch.randn(rank, fi, generator=g) * fi**-0.5 for p, (fi, fo) in shapes.items()}
        b = {p: torch.randn(fo, rank, generator=g) * 0.01 for p, (fi, fo) in shapes.items()}
        return LoraWeights(_spec(kind, i, shapes, rank=rank), a, b)
    if kind == AdapterKind.IA3:  # peft's T5 default: k, v, wo; wo on the input side
        mods = [p for p in shapes if p.rsplit(".", 1)[-1] in ("k", "v", "wo")]
        vec = {p: 1 + 0.1 * torch.randn(shapes[p][0] if p.endswith("wo") else shapes[p][1], generator=g) for p in mods}
        return IA3Weights(_spec(kind, i, mods), vec, {p: p.endswith("wo") for p in mods})
    if kind == AdapterKind.BITFIT:
        return BitFitWeights(_spec(kind, i, shapes), {p: 0.1 * torch.randn(fo, generator=g)
                                                      for p, (fi, fo) in shapes.items()})
    return PromptWeights(_spec(kind, i, (), vt=vt), torch.randn(vt, desc.d_model, generator=g))


def rows_for(kind: AdapterKind | str, batch: int) -> RowAdapters:
    """Every row a distinct adapter; 'mixed' cycles through the three linear kinds plus base rows."""
    if kind == "lora q,v":  # the common LoRA recipe, in slots batch..2*batch-1
        return RowAdapters.from_pairs([(AdapterKind.LORA, batch + i) for i in range(batch)])
    if kind == "mixed":
        cycle = [*KINDS, None]
        return RowAdapters.from_pairs([None if cycle[i % 4] is None else (cycle[i % 4], i) for i in range(batch)])
    return RowAdapters.from_pairs([(kind, i) for i in range(batch)])


def build(preset: dict):
    from transformers import T5ForConditionalGeneration

    from serve.engine.base import t5_config

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(preset["base"])).eval().requires_grad_(False)
    desc = BaseDescription.from_model(model, preset["base"], "bench")
    n = preset["batch"]
    wrapped = copy.deepcopy(model)
    # the kinds that act inside the wrapped model (prefix tuning acts in the engine's decode step)
    model_kinds = (*KINDS, AdapterKind.PROMPT)
    counts = {k: 2 * n if k == AdapterKind.LORA else n for k in model_kinds}
    slots = attach_slots(wrapped, SlotConfig(slots=counts, max_rank=preset["rank"],
                                             max_virtual_tokens=preset["virtual_tokens"]))
    g = torch.Generator().manual_seed(0)
    for kind in model_kinds:
        for i in range(n):
            slots.write(kind, i, random_weights(kind, i, desc, preset["rank"], preset["virtual_tokens"], g))
    for i in range(n):
        slots.write(AdapterKind.LORA, n + i, random_weights(AdapterKind.LORA, n + i, desc, preset["rank"], 0, g,
                                                            targets=("q", "v")))
    return model, wrapped, slots


def layer_section(model, slots, preset: dict, progress) -> list[dict]:
    out = []
    n = preset["batch"]
    for short in preset["layers"]:
        path = next(p for p in slots.layers if p.startswith("decoder.block.0.") and p.endswith("." + short))
        layer, bare = slots.layers[path], model.get_submodule(path)
        for phase, t in (("decode", 1), ("encode", preset["enc_len"])):
            x = torch.randn(n, t, layer.in_features)
            reps = preset["repeats"] * 3 if phase == "decode" else max(2, preset["repeats"] // 3)
            cells = {}
            for name, rows, cached in [("lora", rows_for(AdapterKind.LORA, n), True),
                                       ("lora (no gather cache)", rows_for(AdapterKind.LORA, n), False),
                                       ("ia3", rows_for(AdapterKind.IA3, n), True),
                                       ("bitfit", rows_for(AdapterKind.BITFIT, n), True),
                                       ("mixed", rows_for("mixed", n), True)]:
                slots.set_rows(rows)
                layer.cache_gathered = cached
                cells[name] = compare(lambda bare=bare, x=x: bare(x), lambda layer=layer, x=x: layer(x), reps)
                layer.cache_gathered = True
            base_us = statistics.median(c["base_s"] for c in cells.values()) * 1e6
            out.append({"layer": short, "phase": phase, "shape": [layer.in_features, layer.out_features],
                        "tokens": n * t, "base_us": base_us, "ratio": {k: c["ratio"] for k, c in cells.items()},
                        "ratio_min": {k: c["ratio_min"] for k, c in cells.items()}})
            progress(f"layer {short:5s} {phase:6s} base {base_us:8.1f} us  time vs base: " +
                     "  ".join(f"{k} {c['ratio']:.2f}x" for k, c in cells.items()))
    slots.set_rows(None)
    return out


def model_section(model, wrapped, slots, preset: dict, progress) -> dict:
    n, reps = preset["batch"], preset["repeats"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (n, preset["enc_len"]), generator=g)
    mask = torch.ones_like(ids)
    dec = torch.zeros(n, 1, dtype=torch.long)

    def decode_step(m, rows):
        """One decoder token per row after an 8-token prefix; the KV cache is cropped back after each call."""
        embeds, enc_mask = slots.encoder_inputs(ids, mask, rows)
        slots.set_rows(rows)
        enc = m.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask)
        prefix = torch.zeros(n, 8, dtype=torch.long)
        past = m(encoder_outputs=enc, attention_mask=enc_mask, decoder_input_ids=prefix,
                 use_cache=True).past_key_values

        def step():
            slots.set_rows(rows)  # as a server does every step; unchanged mapping = no new gathers
            m(encoder_outputs=enc, attention_mask=enc_mask, decoder_input_ids=dec, past_key_values=past,
              use_cache=True)
            past.crop(-1)
        return step

    base_step_fn = decode_step(model, RowAdapters.base(n))
    decode = {str(k): compare(base_step_fn, decode_step(wrapped, rows_for(k, n)), reps) for k in MODEL_CASES}
    progress(f"model decode step base {decode['lora']['base_s'] * 1e3:.2f} ms; throughput vs base: " +
             "  ".join(f"{k} {1 / c['ratio']:.2f}x" for k, c in decode.items()))

    def encode(m, rows):
        def run():
            embeds, enc_mask = slots.encoder_inputs(ids, mask, rows)
            slots.set_rows(rows)
            m.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask)
        return run

    base_enc_fn = encode(model, RowAdapters.base(n))
    reps = max(2, reps // 5)  # an encoder pass is ~T times a decoder step
    enc = {str(k): compare(base_enc_fn, encode(wrapped, rows_for(k, n)), reps) for k in MODEL_CASES}
    progress(f"model encoder pass base {enc['lora']['base_s'] * 1e3:.2f} ms; throughput vs base: " +
             "  ".join(f"{k} {1 / c['ratio']:.2f}x" for k, c in enc.items()))
    slots.set_rows(None)
    return {"decode_step_base_ms": decode["lora"]["base_s"] * 1e3,
            "decode_throughput_vs_base": {k: 1 / c["ratio"] for k, c in decode.items()},
            "decode_throughput_vs_base_best": {k: 1 / c["ratio_min"] for k, c in decode.items()},
            "encode_base_ms": enc["lora"]["base_s"] * 1e3,
            "encode_throughput_vs_base": {k: 1 / c["ratio"] for k, c in enc.items()},
            "encode_throughput_vs_base_best": {k: 1 / c["ratio_min"] for k, c in enc.items()}}


def machine() -> dict:
    import os
    import platform

    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    decode_rows = [r for r in results["layer"] if r["phase"] == "decode"]
    names = list(decode_rows[0]["ratio"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax1.bar([i + j * width for i in range(len(decode_rows))], [r["ratio"][name] for r in decode_rows], width,
                label=name)
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(decode_rows))],
                   [f"{r['layer']} {r['shape'][0]}->{r['shape'][1]}" for r in decode_rows])
    ax1.axhline(1, color="k", lw=0.8)
    ax1.set_ylabel("time / bare linear (decode, 1 token/row)")
    ax1.legend(fontsize=8)
    m = results["model"]
    kinds = list(m["decode_throughput_vs_base"])
    ax2.bar([i - 0.2 for i in range(len(kinds))], [m["decode_throughput_vs_base"][k] for k in kinds], 0.4,
            label="decoder step")
    ax2.bar([i + 0.2 for i in range(len(kinds))], [m["encode_throughput_vs_base"][k] for k in kinds], 0.4,
            label="encoder pass")
    ax2.set_xticks(range(len(kinds)), kinds)
    ax2.axhline(1, color="k", lw=0.8)
    ax2.axhline(0.85, color="r", ls="--", lw=0.8, label="0.85x target")
    ax2.set_ylabel("throughput / base model")
    ax2.legend(fontsize=8)
    p = results["preset"]
    fig.suptitle(f"per-row adapter math, {p['base']} shape, batch {p['batch']}, {p['batch']} distinct adapters/kind")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(preset_name: str = "flan-t5-small", out_dir: Path | None = None, progress=print,
        threads: int | None = None) -> dict:
    preset = PRESETS[preset_name]
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(preset_name, preset, out_dir, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(preset_name: str, preset: dict, out_dir: Path | None, progress) -> dict:
    out_dir = Path(out_dir or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"building a random {preset['base']} base and {preset['batch']} adapters per kind ...")
    model, wrapped, slots = build(preset)
    with torch.no_grad():
        results = {"preset": {"name": preset_name, **preset}, "machine": machine(),
                   "layer": layer_section(model, slots, preset, progress),
                   "model": model_section(model, wrapped, slots, preset, progress)}
    stem = out_dir / f"adapter_math-{preset_name}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, stem.with_suffix(".png"))
    progress(f"wrote {stem}.json and {stem}.png")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flan-t5-small")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: loadtests/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is steadier on a shared machine)")
    args = parser.parse_args(argv)
    run(args.preset, args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
