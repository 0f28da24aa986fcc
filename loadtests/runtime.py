"""`peftserve bench --only runtime` (issue 23): the engine's base decode against CTranslate2, the int8 base, and
what adapters cost on the faster base. One run, same base, same input ids, same threads:

- systems: the engine in float32 and in int8 (`dtype: int8`), CTranslate2 float32 and int8 (its own venv,
  loadtests/ct2.py; `ct2-transformers-converter` on the same checkpoint), greedy, exactly `new_tokens` per row
  (the bench base's EOS row is zeroed, CTranslate2 gets min = max decoding length);
- shapes (rows, input tokens, new tokens): the preset's `runtime_shapes`, the first one judged;
- adapters on the float32 base at the first shape: 32 distinct adapters of every kind, each cell's ratio to the
  base beside its roofline (a decoder step cannot cost less than reading the adapters' bytes, and soft prompts
  lengthen the encoder's input: `adapter_rooflines`) and the previous run's figure; LoRA on the int8 base too;
- agreement: greedy tokens of int8 against float32 (engine and CTranslate2 alike), and of the engine against
  CTranslate2 in float32 (the same model: a check that both do the same work), on held-out prompts of a
  trained base of the same shape (loadtests/trained_base.py) and on the random bench base;
- memory: the base's weight bytes in float32 and int8;
- where the time goes: a profile of one decode step and one encoder pass per dtype, by category.

Only one engine is open at a time (two engines' loop threads would each keep an OpenMP team: serve/engine/
threads.py), so the run goes in cycles: float32 engine, CTranslate2 (both types), int8 engine; each system's
figure is its best round over all cycles (interference only slows a run down), ratios best / best.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loadtests.presets import Preset

KIND_CELLS = ("lora", "dora", "ia3", "bitfit", "prompt", "prefix", "seq_bn", "unipelt")
SERVED_AS = {"lora": "lora", "dora": "lora", "ia3": "ia3", "bitfit": "bitfit", "prompt": "prompt",
             "prefix": "prefix", "seq_bn": "adapterhub", "unipelt": "adapterhub"}
# targets (issue 23): engine float32 base / CTranslate2 float32 and engine int8 / CTranslate2 int8 at the judged
# shape; 32 distinct LoRA on the engine / CTranslate2 float32 base
TARGETS = (("base_vs_ct2_float32", ">= 1.0", 1.0), ("int8_vs_ct2_int8", ">= 1.0", 1.0),
           ("lora32_vs_ct2_float32", ">= 0.6", 0.6), ("int8_agreement_trained", ">= 0.95", 0.95))


def log(msg: str) -> None:
    print(f"[bench runtime {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _shape_key(shape) -> str:
    rows, tokens, new = shape
    return f"{rows}x{tokens}->{new}"


def _inputs(tokenizer, rows: int, tokens: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """`rows` prompts of exactly `tokens` ids (byte-level tokenizer: chars + EOS) and their ids."""
    from loadtests.workload import random_texts

    texts = random_texts(rows, tokens - 1, seed)
    ids = [tokenizer(t).input_ids for t in texts]
    if any(len(i) != tokens for i in ids):
        raise ValueError(f"the prompts do not tokenize to {tokens} ids; the runtime section needs a byte-level base")
    return texts, ids


def _engine_round(engine, texts: list[str], adapters: list[str | None], new_tokens: int) -> tuple[float, list]:
    from serve.engine import GenerationParams, GenerationRequest

    reqs = [GenerationRequest(t, adapter=adapters[i % len(adapters)], params=GenerationParams(max_new_tokens=new_tokens))
            for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    seconds = time.perf_counter() - t0
    tokens = sum(r.generated_tokens for r in results)
    if tokens != len(texts) * new_tokens:
        log(f"warning: the engine generated {tokens} tokens, not {len(texts) * new_tokens}")
    return tokens / seconds, [r.token_ids for r in results]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy-token agreement of two systems on the same prompts, position by position up to the longer row (a
    position one row lacks counts as a difference): `positions` = share of positions with the same token;
    `prefix` = share of tokens before the first difference (what greedy decoding shares before it diverges);
    `exact` = share of identical rows."""
    total = same = prefix = 0
    for ra, rb in zip(a, b, strict=True):
        width = max(len(ra), len(rb))
        pairs = [(ra[i] if i < len(ra) else None, rb[i] if i < len(rb) else None) for i in range(width)]
        total += width
        same += sum(x == y for x, y in pairs)
        prefix += next((i for i, (x, y) in enumerate(pairs) if x != y), width)
    return {"positions": same / total if total else None, "prefix": prefix / total if total else None,
            "exact": sum(ra == rb for ra, rb in zip(a, b, strict=True)) / len(a) if a else None, "rows": len(a)}


def runtime(preset: Preset, base_dir: Path, work: Path, out_dir: Path) -> dict:
    import torch

    from loadtests import ct2
    from loadtests.trained_base import ensure_trained_base
    from serve.engine.threads import run_on_fresh_thread

    threads = torch.get_num_threads()
    shapes = [tuple(s) for s in preset.runtime_shapes]
    judged = shapes[0]
    kinds_n = min(32, judged[0])
    log(f"shapes {', '.join(map(_shape_key, shapes))}; {threads} threads; adapters: {kinds_n} distinct per kind")
    # every torch op of the setup on threads that exit (the engines' loop threads must hold the only OpenMP team)
    paths = run_on_fresh_thread(_adapters, preset, base_dir, work, kinds_n)
    trained = run_on_fresh_thread(ensure_trained_base, work, preset, progress=log)
    ct2_base, ct2_trained = (ct2.convert(b, work / "ct2" / b.name) for b in (base_dir, trained))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)  # not load_base: no torch kernel on this thread, ever
    inputs = {s: _inputs(tokenizer, s[0], s[1], preset.seed + i) for i, s in enumerate(shapes)}
    rates: dict[tuple, list[float]] = {}
    outputs: dict[tuple, list] = {}

    def record(key, rate, out):
        rates.setdefault(key, []).append(rate)
        outputs.setdefault(key, out)

    worker = ct2.Ct2Worker(threads)
    engine_info: dict[str, dict] = {}
    try:
        for cycle in range(preset.runtime_cycles):
            for dtype in ("float32", "ct2", "int8"):
                if dtype == "ct2":
                    for q in ("float32", "int8"):
                        worker.load(ct2_base, q)
                        for _ in range(preset.runtime_rounds):
                            for s in shapes:
                                reply = worker.run(inputs[s][1], s[2])
                                record(("ct2", q, s), s[0] * s[2] / reply["seconds"], reply["outputs"])
                    time.sleep(0.5)  # CTranslate2's OpenMP threads spin a while after its last batch
                    continue
                info = _engine_cycle(dtype, preset, base_dir, paths if dtype == "float32" else
                                     {"lora": paths["lora"]}, shapes, inputs, judged, kinds_n, record)
                engine_info[dtype] = info
            log(f"cycle {cycle + 1}/{preset.runtime_cycles} done")
        agree = _agreement_runs(preset, trained, ct2_trained, worker, tokenizer, judged, outputs)
    finally:
        worker.close()
    profile = {dtype: run_on_fresh_thread(_profile, preset, base_dir, dtype, judged) for dtype in ("float32", "int8")}
    result = _summarize(preset, shapes, judged, kinds_n, rates, outputs, agree, engine_info, profile, worker.version,
                        threads, base_dir, paths, work)
    result["plot"] = str(plot(result, out_dir / "runtime.png"))
    (out_dir / "runtime.json").write_text(json.dumps(result, indent=2))
    for t in result["targets"]:
        log(f"{t['what']}: {t['measured'] if t['measured'] is None else round(t['measured'], 3)} "
            f"(target {t['criterion']}): {'met' if t['met'] else 'not met'}")
    return result


def _adapters(preset: Preset, base_dir: Path, work: Path, n: int) -> dict[str, list[Path]]:
    from loadtests.workload import make_adapters

    root = work / "adapters" / base_dir.name  # the cache the other sections use
    return {k: make_adapters(base_dir, root, k, n, preset.lora_rank, preset.prompt_tokens, preset.seed,
                             progress=log)[:n] for k in KIND_CELLS}


def _engine_cycle(dtype: str, preset: Preset, base_dir: Path, paths: dict, shapes: list, inputs: dict, judged,
                  kinds_n: int, record) -> dict:
    from loadtests.engine_driver import close_engine, open_engine
    from loadtests.workload import PREFIX_TOKENS, UNIPELT_LORA_RANK

    rows = max(s[0] for s in shapes)
    slots = {"lora": 2 * kinds_n, "ia3": kinds_n, "bitfit": kinds_n, "prompt": kinds_n, "prefix": kinds_n,
             "adapterhub": 2 * kinds_n}
    t0 = time.perf_counter()
    engine = open_engine(base_dir, preset, dtype=dtype, device_slots=slots, max_batch_rows=rows,
                         host_bytes=8 * 2**30, max_prefix_tokens=PREFIX_TOKENS,
                         max_rank=max(preset.lora_rank, UNIPELT_LORA_RANK),
                         max_new_tokens_cap=max(s[2] for s in shapes), max_input_tokens=max(s[1] for s in shapes))
    start_s = time.perf_counter() - t0
    try:
        names = {k: [] for k in paths}
        for kind, ps in paths.items():
            for p in ps:
                engine.register_adapter(p.name, str(p))
                names[kind].append(p.name)
        texts = inputs[judged][0]
        for kind in names:  # untimed: every adapter resident
            _engine_round(engine, texts, names[kind], 1)
        for s in shapes:
            _engine_round(engine, inputs[s][0], [None], 2)
        for _ in range(preset.runtime_rounds):
            for s in shapes:
                record(("engine", dtype, s), *_engine_round(engine, inputs[s][0], [None], s[2]))
            for kind in names:
                record(("engine", dtype, judged, kind), *_engine_round(engine, texts, names[kind], judged[2]))
        info = engine.info()
    finally:
        close_engine(engine)
    log(f"engine {dtype}: started in {start_s:.1f} s (warm-up {info['warm_up_s']:.2f} s), "
        f"{preset.runtime_rounds} rounds done")
    return {"start_s": start_s, "warm_up_s": info["warm_up_s"], "optimizations": info["optimizations"]}


def _agreement_runs(preset, trained: Path, ct2_trained: Path, worker, tokenizer, judged, outputs) -> dict:
    """Greedy tokens on held-out prompts of the trained base (its own task: loadtests/trained_base.py) for every
    system, then agreement pairs; and the same pairs on the random bench base from the timed runs."""
    from loadtests.engine_driver import close_engine, open_engine
    from loadtests.trained_base import held_out_prompts

    prompts = held_out_prompts(preset.seed + 1000, judged[0])
    new = judged[2]
    ids = [tokenizer(p).input_ids for p in prompts]
    got = {}
    for dtype in ("float32", "int8"):
        engine = open_engine(trained, preset, dtype=dtype, max_batch_rows=len(prompts), max_new_tokens_cap=new,
                             max_input_tokens=max(map(len, ids)))
        try:
            got[("engine", dtype)] = _engine_round(engine, prompts, [None], new)[1]
        finally:
            close_engine(engine)
    for q in ("float32", "int8"):
        worker.load(ct2_trained, q)
        got[("ct2", q)] = worker.run(ids, new)["outputs"]
    pairs = {"int8_vs_float32_engine": (("engine", "int8"), ("engine", "float32")),
             "int8_vs_float32_ct2": (("ct2", "int8"), ("ct2", "float32")),
             "engine_vs_ct2_float32": (("engine", "float32"), ("ct2", "float32"))}
    trained_agree = {name: agreement(_until_eos(got[a]), _until_eos(got[b])) for name, (a, b) in pairs.items()}
    random_agree = {name: agreement(outputs[(*a, judged)], outputs[(*b, judged)]) for name, (a, b) in pairs.items()}
    sample = {f"{s}-{d}": tokenizer.decode(got[(s, d)][0], skip_special_tokens=True) for s, d in got}
    return {"trained_base": trained_agree, "random_base": random_agree, "prompts": len(prompts),
            "new_tokens": new, "sample_prompt": prompts[0], "sample_outputs": sample}


def _until_eos(rows: list[list[int]], eos: int = 1) -> list[list[int]]:
    """The engine stops a row at EOS; CTranslate2 ran min = max length (it goes on past EOS). Compare each row
    up to and including its first EOS."""
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]


def _profile(preset: Preset, base_dir: Path, dtype: str, shape) -> dict:
    """Where one decoder step and one encoder pass spend their time (torch.profiler, self CPU time by op),
    grouped into categories; the judged shape's rows, a mid-sequence step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from adapters import RowAdapters
    from loadtests.engine_driver import close_engine, open_engine
    from serve.engine.decode import decode_step, encode, prefill_cross

    rows, tokens, new = shape
    engine = open_engine(base_dir, preset, dtype=dtype, max_batch_rows=rows, max_new_tokens_cap=new,
                         max_input_tokens=tokens)
    try:
        engine.loop.close()  # this thread drives the decode functions itself
        parts, kv, slots = engine.parts, engine.kv, engine.slots
        base = RowAdapters.from_rows((None,) * rows)
        ids = torch.full((rows, tokens), 5, dtype=torch.long)
        mask = torch.ones(rows, tokens, dtype=torch.long)

        def encoder():
            embeds, m = slots.encoder_inputs(ids, mask, base)
            slots.set_rows(base, token_mask=m)
            prefill_cross(parts, kv, list(range(rows)), encode(parts, embeds, m), m)

        def steps(n: int):
            slots.set_rows(base)
            tok = torch.zeros(rows, dtype=torch.long)
            for p in range(n):
                tok = decode_step(parts, kv, tok, torch.full((rows,), p)).argmax(-1)

        encoder()
        steps(new // 2)
        out = {}
        for name, fn, per in (("encoder_pass", encoder, 1), ("decode_step", lambda: steps(new), new)):
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) / per
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            out[name] = {"wall_ms": wall * 1e3, "by_category_ms": _categories(prof, per)}
        return out
    finally:
        close_engine(engine)


CATEGORIES = (("linear GEMMs", ("aten::mm", "aten::addmm", "aten::linear", "quantized::linear_dynamic")),
              ("attention", ("aten::bmm", "aten::matmul", "aten::_softmax", "aten::softmax")),
              ("norms", ("aten::_fused_rms_norm", "aten::rms_norm", "aten::pow", "aten::mean", "aten::rsqrt")),
              ("activation", ("aten::gelu", "aten::relu")),
              ("KV cache writes", ("aten::index_put_", "aten::_index_put_impl_", "aten::copy_")),
              ("int8 row scaling", ("aten::amax", "aten::amin", "aten::maximum", "aten::div", "aten::neg")),
              ("argmax / logits", ("aten::argmax",)))


def _categories(prof, per: int) -> dict[str, float]:
    """Self CPU time per category (ms per pass/step); the LM head is the largest mm and counts as linear GEMMs;
    'other kernels' holds the rest of the ops, 'Python and dispatch' the wall time no op accounts for."""
    totals = {name: 0.0 for name, _ in CATEGORIES}
    other = 0.0
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / per
        for name, ops in CATEGORIES:
            if ev.key in ops:
                totals[name] += ms
                break
        else:
            other += ms
    totals["other kernels"] = other
    return {k: round(v, 3) for k, v in totals.items()}


def _summarize(preset, shapes, judged, kinds_n, rates, outputs, agree, engine_info, profile, ct2_version, threads,
               base_dir, paths, work) -> dict:
    best = {k: max(v) for k, v in rates.items()}
    systems = (("engine", "float32"), ("engine", "int8"), ("ct2", "float32"), ("ct2", "int8"))
    by_shape = []
    for s in shapes:
        row = {"shape": _shape_key(s), "rows": s[0], "input_tokens": s[1], "new_tokens": s[2]}
        for sys_, d in systems:
            row[f"{sys_}_{d}_tokens_per_s"] = best.get((sys_, d, s))
        ef, ei = row["engine_float32_tokens_per_s"], row["engine_int8_tokens_per_s"]
        cf, ci = row["ct2_float32_tokens_per_s"], row["ct2_int8_tokens_per_s"]
        row["engine_float32_vs_ct2_float32"] = ef / cf if ef and cf else None
        row["engine_int8_vs_ct2_int8"] = ei / ci if ei and ci else None
        row["engine_int8_vs_engine_float32"] = ei / ef if ei and ef else None
        by_shape.append(row)
    base32 = best[("engine", "float32", judged)]
    f32 = profile.get("float32", {})
    roofline = adapter_rooflines(base_dir, paths, judged, preset.lora_rank,
                                 f32.get("encoder_pass", {}).get("wall_ms"), f32.get("decode_step", {}).get("wall_ms"))
    earlier = _earlier_ratios(work)
    kinds = []
    for k in KIND_CELLS:
        tps = best.get(("engine", "float32", judged, k))
        ratio = tps / base32 if tps else None
        before = earlier.get(k)
        rl = roofline.get(k, {}).get("roofline")
        kinds.append({"kind": k, "served_as": SERVED_AS[k], "distinct": kinds_n, "tokens_per_s": tps,
                      "ratio_to_base": ratio, "previous_ratio": before, "roofline": rl, **roofline.get(k, {}),
                      "within_roofline": None if ratio is None or before is None or rl is None
                      else ratio >= min(before, rl) - 0.02})
    lora_int8 = best.get(("engine", "int8", judged, "lora"))
    ct2f = best[("ct2", "float32", judged)]
    j = by_shape[0]
    targets_measured = {"base_vs_ct2_float32": j["engine_float32_vs_ct2_float32"],
                        "int8_vs_ct2_int8": j["engine_int8_vs_ct2_int8"],
                        "lora32_vs_ct2_float32": (best.get(("engine", "float32", judged, "lora")) or 0) / ct2f,
                        "int8_agreement_trained": agree["trained_base"]["int8_vs_float32_engine"]["positions"]}
    whats = {"base_vs_ct2_float32": f"engine float32 base / CTranslate2 float32 ({_shape_key(judged)})",
             "int8_vs_ct2_int8": f"engine int8 base / CTranslate2 int8 ({_shape_key(judged)})",
             "lora32_vs_ct2_float32": f"{kinds_n} distinct LoRA (engine float32) / CTranslate2 float32 base",
             "int8_agreement_trained": f"int8 / float32 greedy-token agreement at {judged[2]} tokens (trained base)"}
    targets = [{"key": key, "what": whats[key], "criterion": crit, "target": thr, "measured": targets_measured[key],
                "met": None if targets_measured[key] is None else targets_measured[key] >= thr}
               for key, crit, thr in TARGETS]
    opt = engine_info.get("int8", {}).get("optimizations", {})
    return {"ct2_version": ct2_version, "threads": threads, "shapes": by_shape, "judged_shape": _shape_key(judged),
            "rounds": preset.runtime_rounds, "cycles": preset.runtime_cycles, "kinds": kinds,
            "lora_int8_tokens_per_s": lora_int8,
            "lora_int8_ratio_to_int8_base": lora_int8 / best[("engine", "int8", judged)] if lora_int8 else None,
            "agreement": agree, "memory": {"float32_linear_weight_bytes": opt.get("float_weight_bytes"),
                                           "int8_linear_weight_bytes": opt.get("int8_weight_bytes"),
                                           "saved_bytes": (opt.get("float_weight_bytes") or 0)
                                           - (opt.get("int8_weight_bytes") or 0)},
            "engine_start": engine_info, "profile": profile, "targets": targets,
            "rates_runs": {"|".join(map(str, k)): v for k, v in rates.items()}}


def adapter_rooflines(base_dir: Path, paths: dict, shape, rank: int, encoder_ms: float | None = None,
                      step_ms: float | None = None) -> dict[str, dict]:
    """Per kind: bytes one decoder step reads for the base (decoder linears, LM head, the rows' KV cache at
    mid-sequence) and what `distinct` adapters of the kind add (their decoder-side tensors, from the files'
    headers; soft prompts widen every row's cross-attention keys/values, prefixes add self-attention keys/values
    per row). step_roofline = base / (base + added): the ratio a memory-bound step could not beat.

    A request is one encoder pass and `new` steps. With the measured encoder pass and step times (the profile),
    roofline = (encoder + new x step) / (encoder x input growth + new x step / step_roofline): the encoder is
    compute-bound, and soft prompts lengthen its input by their virtual tokens (the others leave it as is).
    The faster the decoder step, the larger the encoder's share, and the more a soft prompt costs."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from loadtests.adapter_math import decode_step_bytes

    cfg = AutoConfig.from_pretrained(base_dir)
    rows, tokens, new = shape
    inner, layers, elem = cfg.num_heads * cfg.d_kv, cfg.num_decoder_layers, 4
    kv_row = 2 * layers * inner * elem  # keys + values of one position in every decoder layer
    base = decode_step_bytes(cfg, 0, rank, elem)["base_bytes"] + rows * kv_row * (tokens + new // 2)
    out = {}
    for kind, ps in paths.items():
        added, growth = 0, 1.0
        for p in ps:
            for f in p.glob("*.safetensors"):
                with safe_open(str(f), "pt") as st:
                    for key in st.keys():
                        if "decoder" in key:
                            added += _numel(st.get_slice(key).get_shape()) * elem
        if kind in ("prompt", "prefix"):  # no decoder weights: each row reads its virtual tokens' keys and values
            virtual = int(json.loads((ps[0] / "adapter_config.json").read_text()).get("num_virtual_tokens", 0))
            added = rows * kv_row * virtual
            growth = (tokens + virtual) / tokens if kind == "prompt" else 1.0
        step_roofline = base / (base + added)
        roofline = step_roofline if not (encoder_ms and step_ms) else \
            (encoder_ms + new * step_ms) / (encoder_ms * growth + new * step_ms / step_roofline)
        out[kind] = {"base_step_bytes": base, "adapter_step_bytes": added, "step_roofline": step_roofline,
                     "encoder_input_growth": growth, "roofline": roofline}
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _earlier_ratios(work: Path) -> dict[str, float]:
    """Each kind's ratio to the engine base at 32 distinct adapters in the committed results before this section
    existed (loadtests/results/cpu-small/results.json: throughput and methods sections)."""
    path = Path(__file__).parent / "results" / "cpu-small" / "results.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for c in res.get("throughput", {}).get("cells", []):
        if c.get("peer") == "engine" and c.get("distinct") == 32 and c.get("kind") in KIND_CELLS:
            out[c["kind"]] = c.get("ratio_to_base")
    for c in res.get("methods", {}).get("cells", []):
        if c.get("kind") in KIND_CELLS and c.get("ratio_to_base") is not None:
            out[c["kind"]] = c["ratio_to_base"]
    return out


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    shapes = result["shapes"]
    systems = (("engine_float32", "engine float32", "tab:blue"), ("engine_int8", "engine int8", "tab:cyan"),
               ("ct2_float32", "CTranslate2 float32", "tab:gray"), ("ct2_int8", "CTranslate2 int8", "silver"))
    width = 0.2
    for i, (key, label, color) in enumerate(systems):
        ys = [s[f"{key}_tokens_per_s"] or 0 for s in shapes]
        ax.bar([x + (i - 1.5) * width for x in range(len(shapes))], ys, width, label=label, color=color)
    ax.set_xticks(range(len(shapes)), [s["shape"] for s in shapes])
    ax.set_xlabel("rows x input tokens -> new tokens")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"base decode, {result['threads']} threads (CTranslate2 {result['ct2_version']})")
    ax.legend()
    kinds = [k for k in result["kinds"] if k["ratio_to_base"] is not None]
    xs = range(len(kinds))
    bx.bar(xs, [k["ratio_to_base"] for k in kinds], color="tab:blue", label="now / engine float32 base")
    bx.scatter(xs, [k["roofline"] for k in kinds], color="black", marker="_", s=300, label="roofline (adapter bytes, encoder work)")
    bx.scatter([x for x, k in zip(xs, kinds, strict=True) if k["previous_ratio"]],
               [k["previous_ratio"] for k in kinds if k["previous_ratio"]], color="tab:red", marker="x",
               label="before issue 23")
    bx.set_xticks(list(xs), [k["kind"] for k in kinds], rotation=30)
    bx.set_ylim(0, 1.1)
    bx.set_title(f"{kinds[0]['distinct'] if kinds else ''} distinct adapters per batch, ratio to the base")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
