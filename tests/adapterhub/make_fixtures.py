"""Build the AdapterHub oracle fixtures: two tiny T5 bases, AdapterHub adapters of every kind peftserve serves,
and the tokens/logits AdapterHub itself generates with them.

Runs only in the oracle venv (adapters 1.3.0 + transformers 4.57, see oracle_venv.py); the project's own
`adapters` package must not shadow AdapterHub's, so run it as a script, not with the repo root on sys.path:

    $(.venv/bin/python -m tests.adapterhub.oracle_venv) tests/adapterhub/make_fixtures.py --out tests/adapterhub/fixtures

Deterministic: every weight (base and adapter) is drawn from a torch.Generator seeded per base / per adapter,
so the same torch version writes the same numbers. The output directory is replaced as a whole.

What it checks before writing anything it cannot vouch for:
- every adapter parameter was randomized (an unknown parameter kind stops the script);
- every adapter moves the logits of every prompt and changes the greedy tokens of at least one prompt;
- AdapterHub reloads each saved directory (`load_adapter`) and reproduces the tokens and logits exactly,
  from the safetensors file this script deduplicated where AdapterHub could not write one itself;
- the whole fixture tree stays under MAX_TOTAL_BYTES.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import zlib
from pathlib import Path

import torch

MAX_TOTAL_BYTES = 2_000_000
GENERATION = dict(max_new_tokens=6, num_beams=1, do_sample=False, use_cache=True)
# Three lengths: short (inside T5's exact relative-position buckets), medium, and long enough that the
# prefix's shift of the key positions moves keys into other logarithmic buckets.
PROMPTS = [
    "hi",
    "summarize: owls hunt at night",
    "translate English to German: the small grey owl sleeps in the old barn all day long.",
]
# Full float32 logits ([steps, 384], 9 KB a case) are stored for the bases on every prompt and for the
# adapters on the longest prompt only: all cases would be about 1 MB, more than the rest of the fixtures.
# The greedy tokens of every case are in expected.json.
ADAPTER_LOGIT_PROMPTS = (2,)
# Every case's greedy choice beats the runner-up by at least this much at every step, so an implementation
# that differs from AdapterHub only by float rounding reproduces the tokens; an adapter whose random draw
# gives a closer call is redrawn with the next seed.
MIN_TOP1_MARGIN = 1e-3
SEED_ATTEMPTS = 20
SAFE_WEIGHTS = "adapter.safetensors"
PICKLE_WEIGHTS = "pytorch_adapter.bin"
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
# The only fixture that keeps AdapterHub's pickle (input of the convert test); the others keep just safetensors.
KEEP_PICKLE = "prefix_tuning"
# The fixture that keeps AdapterHub's prediction-head files (the T5 LM head), which the server must ignore.
KEEP_HEADS = ("seq_bn",)
# Which of its keys a shared prefix-pool tensor is stored under (AdapterHub's loader finds it under any of them):
# "first" in state-dict order (the first attention layer's; what `peftserve adapters convert` keeps),
# "model_level" (the pool's own module, `prefix_tuning.prefix_tunings...`, no layer path), or "save_model"
# (whatever `safetensors.torch.save_model` keeps of the whole model: the alphabetically first name).
POOL_KEY_FORMS = {"prefix_model_level": "model_level", "mam_model_level": "model_level",
                  "prefix_save_model": "save_model"}
POOL_KEY_PREFIX = {"model_level": "prefix_tuning.prefix_tunings.",
                   "save_model": "decoder.block.0.layer.0.SelfAttention.prefix_tuning.pool.prefix_tunings."}

COMMON = dict(vocab_size=384, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
BASES = {
    # FLAN-T5-like: gated-GELU, untied head, heads*d_kv (24) != d_model (32), more decoder than encoder layers.
    "base_gated": dict(seed=0, feed_forward_proj="gated-gelu", d_model=32, d_kv=8, num_heads=3, d_ff=48,
                       num_layers=2, num_decoder_layers=3, tie_word_embeddings=False, **COMMON),
    # Original-T5-like: ReLU FFN (wi, no wi_0/wi_1), tied embeddings (decoder output scaled by d_model**-0.5).
    # Random tied ReLU T5s decode one token over and over; `init` keeps this one from it (see build_base).
    "base_relu": dict(seed=3, init=dict(out_gain=3.0, center_ffn_out=True, final_norm_gain=3.0),
                      feed_forward_proj="relu", d_model=32, d_kv=8, num_heads=4, d_ff=64,
                      num_layers=2, num_decoder_layers=2, tie_word_embeddings=True, **COMMON),
}


def adapter_cases(ah) -> list[tuple[str, str, object, str]]:
    """(fixture dir = AdapterHub adapter name, base, AdapterHub config, what it covers)."""
    # PrefixTuningConfig's default bottleneck_size (512) makes one tiny-base prefix adapter ~1 MB; 8 keeps the
    # MLP reparametrization (same code path) at a few KB. MAM keeps the 16 it is specified with.
    def prefix(bottleneck_size=8, **kw):
        return ah.PrefixTuningConfig(prefix_length=4, bottleneck_size=bottleneck_size, **kw)

    lora = dict(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)
    unipelt = ah.UniPELTConfig(prefix_tuning=prefix())  # + SeqBn(16) + LoRA(r=8, alpha=2); all gated
    g = "base_gated"
    return [
        ("seq_bn", g, ah.SeqBnConfig(), "Pfeiffer: after the FFN; keeps the head files"),
        ("seq_bn_rf_map", g, ah.SeqBnConfig(reduction_factor={"1": 8, "default": 16}), "per-layer reduction"),
        ("seq_bn_swish", g, ah.SeqBnConfig(non_linearity="swish"), "swish bottleneck"),
        ("seq_bn_ln", g, ah.SeqBnConfig(ln_before=True, ln_after=True), "adapter LayerNorms before/after"),
        ("seq_bn_residual_after_ln", g, ah.SeqBnConfig(residual_before_ln=False), "residual_before_ln=False"),
        ("seq_bn_no_original_ln_before", g, ah.SeqBnConfig(original_ln_before=False), "original_ln_before=False"),
        # adapter_residual_before_ln only changes anything when there is an ln_after to be before.
        ("seq_bn_adapter_residual_before_ln", g, ah.SeqBnConfig(adapter_residual_before_ln=True, ln_after=True),
         "adapter residual inside ln_after"),
        ("seq_bn_mh_cross", g, ah.SeqBnConfig(mh_adapter=True, cross_adapter=True),
         "also after self-attention and cross-attention"),
        ("seq_bn_scaling_learned", g, ah.SeqBnConfig(scaling="learned"), "learned scalar scaling"),
        ("seq_bn_scaling_channel", g, ah.SeqBnConfig(scaling="channel"), "learned per-channel scaling"),
        ("seq_bn_leave_out", g, ah.SeqBnConfig(leave_out=[0]), "no adapter in layer 0 (encoder block 0)"),
        ("seq_bn_gated", g, ah.SeqBnConfig(use_gating=True), "sigmoid gate"),
        ("double_seq_bn", g, ah.DoubleSeqBnConfig(), "Houlsby: after attention and FFN"),
        ("par_bn", g, ah.ParBnConfig(), "parallel, scaling 4"),
        ("par_bn_gated", g, ah.ParBnConfig(use_gating=True), "parallel with gate"),
        ("prefix_tuning", g, prefix(), "encoder + cross + decoder-self prefixes; keeps the .bin"),
        ("prefix_no_encoder", g, prefix(encoder_prefix=False), "no encoder prefix"),
        ("prefix_no_cross", g, prefix(cross_prefix=False), "no cross-attention prefix"),
        ("prefix_flat", g, prefix(flat=True), "prefixes stored directly (no MLP)"),
        ("prefix_gated", g, prefix(use_gating=True, shared_gating=False), "separate key/value gates"),
        ("prefix_gated_shared", g, prefix(use_gating=True, shared_gating=True), "one gate for key and value"),
        ("lora", g, ah.LoRAConfig(**lora), "q,k,v of self+cross attention, wi_1, wo"),
        ("lora_gated", g, ah.LoRAConfig(**lora, use_gating=True), "gate replaces alpha/r"),
        ("lora_leave_out", g, ah.LoRAConfig(**lora, leave_out=[1]), "no LoRA in layer 1 (encoder block 1)"),
        ("ia3", g, ah.IA3Config(), "k,v of self+cross attention, wi_1"),
        ("ia3_gated", g, ah.IA3Config(use_gating=True), "gated scale vectors"),
        ("unipelt", g, unipelt, "gated prefix + seq_bn + LoRA"),
        ("mam", g, ah.MAMConfig(prefix(bottleneck_size=16), ah.ParBnConfig()), "prefix + parallel adapter"),
        ("prefix_model_level", g, prefix(), "prefix pool stored once, under the model-level key"),
        ("mam_model_level", g, ah.MAMConfig(prefix(), ah.ParBnConfig(reduction_factor=8)),
         "MAM, prefix pool under the model-level key"),
        ("prefix_save_model", g, prefix(flat=True), "flat prefix pool under the name safetensors.save_model keeps"),
        ("relu_seq_bn", "base_relu", ah.SeqBnConfig(), "seq_bn on the ReLU base"),
        ("relu_lora", "base_relu", ah.LoRAConfig(**lora), "LoRA on wi (no wi_1) and wo"),
        ("relu_unipelt", "base_relu", ah.UniPELTConfig(prefix_tuning=prefix()), "UniPELT on the ReLU base"),
    ]


# ---- bases ------------------------------------------------------------------------------------------------


def build_base(name: str, spec: dict, out: Path):
    """T5's own init scheme, drawn from a seeded generator, with tweaks (spec["init"]) that keep random tiny
    models from degenerate greedy decoding:
    - out_gain scales the attention output (o) and FFN output (wo) projections: the sub-layers, not the input
      token's own embedding, dominate the residual stream (with tied embeddings the logits are h . E, so a
      stream dominated by the input token makes greedy decoding repeat it);
    - center_ffn_out makes each row of wo sum to zero: ReLU outputs are nonnegative, so a random wo adds the
      same direction (wo @ E[relu]) at every position and every prompt decodes the same token;
    - final_norm_gain scales the decoder's final RMSNorm weight (logit scale of the tied head)."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    spec = dict(spec)
    seed, init = spec.pop("seed"), spec.pop("init", {})
    config = T5Config(**spec)
    model = T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    d, dkv, h, dff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    out_gain = init.get("out_gain", 1.0)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # a tied lm_head is not listed separately
            leaf = pname.rsplit(".", 2)[-2] if pname.endswith(".weight") else pname
            if pname == "shared.weight":
                std = 1.0
            elif pname == "lm_head.weight":
                std = d**-0.5  # logits of unit scale: greedy choices are not decided by one huge logit
            elif "layer_norm" in pname:
                gain = init.get("final_norm_gain", 1.0) if pname == "decoder.final_layer_norm.weight" else 1.0
                p.copy_(gain * (1 + 0.2 * _randn(p, gen)))  # not all ones, so a misplaced norm shows
                continue
            elif leaf == "relative_attention_bias":
                std = 1.0  # comparable to the attention scores: relative positions (and their shift) matter
            elif leaf == "q":
                std = 2 * (d * dkv) ** -0.5  # T5 does not scale scores by d_kv**-0.5; init does, sharpened 2x
            elif leaf in ("k", "v", "wi", "wi_0", "wi_1"):
                std = d**-0.5
            elif leaf == "o":
                std = out_gain * (h * dkv) ** -0.5
            elif leaf == "wo":
                std = out_gain * dff**-0.5
            else:
                raise SystemExit(f"build_base: no init rule for base parameter {pname}")
            value = std * _randn(p, gen)
            if leaf == "wo" and init.get("center_ffn_out"):
                value -= value.mean(dim=1, keepdim=True)
            p.copy_(value)
    model.eval()
    path = out / name
    model.save_pretrained(path, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(path)
    return path


def _randn(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)


def load_base(path: Path):
    from transformers import T5ForConditionalGeneration

    import adapters

    model = T5ForConditionalGeneration.from_pretrained(path)
    # save_adapter records this as "model_name": the base's fixture name, not the (temporary) build path
    model.config.name_or_path = path.name
    adapters.init(model)
    return model.eval()


# ---- adapters ---------------------------------------------------------------------------------------------


def randomize_adapter(model, name: str, seed: int) -> int:
    """Overwrite every parameter of adapter `name` (AdapterHub's init leaves LoRA B / up-projections at zero
    and gates near 0.5, which would hide most of the math). Returns the number of tensors set."""
    from adapters.methods.lora import IA3, LoRA
    from adapters.methods.modeling import Adapter
    from adapters.methods.prefix_tuning import FlatPrefixTuning

    belongs = _adapter_filter(model, name)
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        # named_modules() visits a shared module once: the prefix pool hangs under every attention layer.
        for mod_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{pname}"
                if not belongs(full):
                    continue
                is_gate = mod_name.endswith(".gate") or ".prefix_gates." in mod_name
                if isinstance(module, torch.nn.LayerNorm):
                    value = (1.0 if pname == "weight" else 0.0) + 0.2 * _randn(p, gen)
                elif isinstance(module, torch.nn.Embedding):  # prefix "token" embeddings (wte)
                    value = _randn(p, gen)
                elif isinstance(module, torch.nn.Linear) and pname == "weight":
                    # gates: logits of std ~2 on unit-scale inputs, so gates spread over (0.1, 0.9) and differ
                    # per token instead of all sitting at 0.5; everything else: unit-gain projections
                    gain = 2.0 if is_gate else 1.0
                    value = gain * p.shape[1] ** -0.5 * _randn(p, gen)
                elif isinstance(module, torch.nn.Linear) and pname == "bias":
                    value = (0.5 if is_gate else 0.2) * _randn(p, gen)
                elif isinstance(module, IA3) and pname == "lora_B":
                    value = 1 + 0.5 * _randn(p, gen)  # scale vectors around 1
                elif isinstance(module, LoRA) and pname == "lora_A":
                    value = p.shape[1] ** -0.5 * _randn(p, gen)
                elif isinstance(module, LoRA) and pname == "lora_B":
                    value = 0.5 * p.shape[1] ** -0.5 * _randn(p, gen)
                elif isinstance(module, Adapter) and pname == "scaling":  # "learned" / "channel"
                    value = 1 + 0.5 * _randn(p, gen)
                elif isinstance(module, FlatPrefixTuning) and pname == "control_trans":
                    value = _randn(p, gen)  # keys/values directly: unit scale like the base's k/v
                else:
                    raise SystemExit(f"randomize_adapter: no rule for {full} ({type(module).__name__})")
                p.copy_(value)
                count += 1
    if not count:
        raise SystemExit(f"randomize_adapter: adapter {name} has no parameters")
    return count


def _adapter_filter(model, name: str):
    from adapters.loading import AdapterLoader

    return AdapterLoader(model).filter_func(name)


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """What save_adapter writes, in the same order (aliases included)."""
    belongs = _adapter_filter(model, name)
    return {k: v for k, v in model.state_dict().items() if belongs(k)}


def dedup_aliases(state: dict[str, torch.Tensor], prefer: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop later keys that are the very same tensor as an earlier key (same storage, offset, shape, stride):
    each shared tensor is stored once, under its first key in state-dict order, or under its key starting with
    `prefer` where it has one. A key that only overlaps another's storage as a different view is kept, as its
    own copy."""
    if prefer is not None:  # a stable sort: the preferred keys first, otherwise state-dict order
        state = dict(sorted(state.items(), key=lambda kv: not kv[0].startswith(prefer)))
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    dropped = []
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in seen:
            dropped.append(key)
            continue
        seen[ident] = key
        kept[key] = t.detach().clone() if ptr in storages else t.detach()
        storages.add(ptr)
    return {k: v.contiguous() for k, v in kept.items()}, dropped


def save_adapter_dir(model, name: str, path: Path) -> dict:
    """save_adapter with safetensors where AdapterHub can; else its pickle plus a deduplicated safetensors file
    (the pool under the key form POOL_KEY_FORMS names)."""
    from safetensors.torch import save_file

    heads = name in KEEP_HEADS
    form = POOL_KEY_FORMS.get(name, "first")
    try:
        model.save_adapter(str(path), name, with_head=heads, use_safetensors=True)
        if form != "first":
            raise SystemExit(f"{name}: AdapterHub wrote safetensors itself; there is no pool key form to choose")
        return {"weights_written_by": "adapterhub", "dropped_aliases": 0}
    except RuntimeError as e:
        if "share memory" not in str(e):
            raise
    # Tensors shared between modules (the prefix pool under every attention layer and at model level;
    # adapter_norm_before, which is also adapter_down.0) make safetensors refuse the state dict.
    shutil.rmtree(path)
    model.save_adapter(str(path), name, with_head=heads)
    saved = torch.load(path / PICKLE_WEIGHTS, map_location="cpu", weights_only=True)
    mine = adapter_state_dict(model, name)
    if list(saved) != list(mine):
        raise SystemExit(f"{name}: pytorch_adapter.bin keys differ from the model's adapter state dict")
    if form == "save_model":
        kept = save_model_keeps(model, name, path)
        dropped = sorted(set(mine) - set(kept))
        by = "safetensors.torch.save_model (whole model), adapter keys kept"
    else:
        kept, dropped = dedup_aliases(mine, prefer=POOL_KEY_PREFIX.get(form))
        by = "make_fixtures (deduplicated)"
    pool = [k for k in kept if ".prefix_tunings." in k]
    if form != "first" and not (pool and all(k.startswith(POOL_KEY_PREFIX[form]) for k in pool)):
        raise SystemExit(f"{name}: the prefix pool was not stored in the {form} form: {pool[:2]}")
    save_file(kept, str(path / SAFE_WEIGHTS), metadata={"format": "pt"})
    return {"weights_written_by": by, "dropped_aliases": len(dropped), "pool_key_form": form if pool else None}


def save_model_keeps(model, name: str, path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors as `safetensors.torch.save_model(model, ...)` writes them: each group of tensors
    sharing storage once, under the name it keeps (the alphabetically first complete one)."""
    from safetensors.torch import load_file, save_model

    whole = path / "whole_model.safetensors"
    save_model(model, str(whole))
    belongs = _adapter_filter(model, name)
    kept = {k: v for k, v in load_file(str(whole)).items() if belongs(k)}
    whole.unlink()
    return kept


# ---- generation -------------------------------------------------------------------------------------------


def generate(model, input_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    ids = torch.tensor([input_ids])
    # transformers 4.57 sizes generate's default cache by num_layers (the encoder's), which fails with more
    # decoder layers (base_gated); caches that grow per layer are the same cache otherwise.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), output_logits=True,
                             return_dict_in_generate=True, past_key_values=cache, **GENERATION)
    tokens = out.sequences[0, 1:].tolist()  # drop the decoder start token
    logits = torch.stack([step[0] for step in out.logits]).to(torch.float32)
    return tokens, logits


def full_forward_diff(model, input_ids: list[int], tokens: list[int], logits: torch.Tensor) -> float:
    """Teacher-forced full decoder pass over the generated tokens vs the incremental logits. Differs where a
    gate averages over the decoder sequence (it sees one token per step in generate, all of them here)."""
    ids = torch.tensor([input_ids])
    dec = torch.tensor([[model.config.decoder_start_token_id, *tokens[:-1]]])
    with torch.no_grad():
        full = model(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits[0]
    return float((full - logits).abs().max())


def top1_margin(logits: torch.Tensor) -> float:
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def draw_adapter(base_dir: Path, name: str, config, prompts, base_runs):
    """Add the adapter to a fresh base, randomize it and generate; redraw (next seed) while some greedy step
    is a near tie. Returns (model, seed, [(tokens, logits)] per prompt, number of tensors randomized)."""
    first = zlib.crc32(name.encode())
    for seed in range(first, first + SEED_ATTEMPTS):
        model = load_base(base_dir)  # fresh per draw: nothing carries over between fixtures
        model.add_adapter(name, config=config)
        n = randomize_adapter(model, name, seed)
        model.set_active_adapters(name)
        runs = [generate(model, p["input_ids"]) for p in prompts]
        if min(top1_margin(logits) for _, logits in runs) < MIN_TOP1_MARGIN:
            continue
        for i, (_, logits) in enumerate(runs):
            base_logits = base_runs[i][1]
            steps = min(len(logits), len(base_logits))
            if float((logits[:steps] - base_logits[:steps]).abs().max()) < 0.05:
                raise SystemExit(f"{name}: prompt {i}: logits barely move from the base; raise the weight scale")
        if all(tokens == base_runs[i][0] for i, (tokens, _) in enumerate(runs)):
            raise SystemExit(f"{name}: greedy tokens equal the base's on every prompt")
        return model, seed, runs, n
    raise SystemExit(f"{name}: {SEED_ATTEMPTS} draws all had a greedy step decided by < {MIN_TOP1_MARGIN}")


# ---- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory (replaced)")
    args = parser.parse_args(argv)

    import adapters as ah

    if not hasattr(ah, "init"):
        raise SystemExit(f"`import adapters` found {ah.__file__}, not AdapterHub: run this script with the "
                         "oracle venv's python and without the repo root on PYTHONPATH")
    import logging
    import warnings

    import transformers
    from safetensors.torch import save_file
    from transformers import ByT5Tokenizer

    # AdapterHub warns on every set_active_adapters and transformers 4.57 about its own deprecated kwargs.
    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and run-to-run reduction-order noise)
    out: Path = args.out.resolve()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tok = ByT5Tokenizer()
    prompts = [{"text": t, "input_ids": tok(t).input_ids} for t in PROMPTS]
    expected: dict = {
        "generator": "tests/adapterhub/make_fixtures.py",
        "versions": {"adapters": _dist_version("adapters"), "transformers": transformers.__version__,
                     "torch": torch.__version__.split("+")[0]},
        "generation": {**GENERATION, "batch": 1, "padding": False, "output_logits": "raw (before processors)"},
        "prompts": prompts,
        "bases": {},
        "adapters": {},
        "cases": [],
    }
    all_logits: dict[str, torch.Tensor] = {}

    base_runs: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for base, spec in BASES.items():
        model = load_base(build_base(base, spec, tmp))
        expected["bases"][base] = {"dir": base, **spec}
        runs = [generate(model, p["input_ids"]) for p in prompts]
        if len({tuple(t) for t, _ in runs}) < len(runs):
            raise SystemExit(f"{base}: the base generates the same tokens for different prompts; rescale it")
        base_runs[base] = runs
        for i, (tokens, logits) in enumerate(runs):
            if top1_margin(logits) < MIN_TOP1_MARGIN:
                raise SystemExit(f"{base}: prompt {i} has a near-tie greedy step; change the base seed")
            _record(expected, all_logits, base, None, i, tokens, logits,
                    full_forward_diff(model, prompts[i]["input_ids"], tokens, logits))

    for name, base, config, covers in adapter_cases(ah):
        model, seed, runs, n = draw_adapter(tmp / base, name, config, prompts, base_runs[base])
        path = tmp / name
        for i, (tokens, logits) in enumerate(runs):
            _record(expected, all_logits, base, name, i, tokens, logits,
                    full_forward_diff(model, prompts[i]["input_ids"], tokens, logits),
                    keep_logits=i in ADAPTER_LOGIT_PROMPTS)
        saved = save_adapter_dir(model, name, path)

        _check_reload(tmp / base, path, name, prompts, runs, use_pickle=False)
        if (path / PICKLE_WEIGHTS).exists():
            if name == KEEP_PICKLE:
                _check_reload(tmp / base, path, name, prompts, runs, use_pickle=True)
            else:
                (path / PICKLE_WEIGHTS).unlink()
        expected["adapters"][name] = {
            "dir": name, "base": base, "covers": covers, "config_class": type(config).__name__,
            "seed": seed, "tensors_randomized": n, **saved, "files": sorted(f.name for f in path.iterdir()),
        }
        redraws = seed - zlib.crc32(name.encode())
        print(f"{name:34s} {base:10s} {n:4d} tensors, {redraws} redraws, {saved['weights_written_by']}", flush=True)

    save_file(all_logits, str(tmp / "expected_logits.safetensors"), metadata={"format": "pt"})
    (tmp / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    (tmp / "README.md").write_text(_readme(expected))
    total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"fixtures are {total} bytes, above {MAX_TOTAL_BYTES}; shrink them")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # never a half-written fixture tree under `out`
    print(f"wrote {out} ({total} bytes, {len(expected['cases'])} cases)")
    return 0


def _record(expected, all_logits, base, adapter, prompt, tokens, logits, ff_diff, keep_logits=True):
    case = f"{base}/{adapter or 'base'}/{prompt}"
    if keep_logits:
        all_logits[case] = logits.contiguous()
    expected["cases"].append({
        "case": case, "base": base, "adapter": adapter, "prompt": prompt, "tokens": tokens,
        "steps": len(tokens), "logits": keep_logits, "min_top1_margin": round(top1_margin(logits), 6),
        "full_forward_max_abs_diff": float(f"{ff_diff:.3g}"),
    })


def _check_reload(base_dir: Path, path: Path, name: str, prompts, runs, use_pickle: bool) -> None:
    """A fresh AdapterHub model loads the directory and reproduces tokens and logits."""
    model = load_base(base_dir)
    info: dict = {}
    if use_pickle:
        loaded = model.load_adapter(str(path), set_active=True, loading_info=info)
    else:
        # Reads adapter.safetensors; our deduplicated file lacks the aliases, which AdapterHub reports as
        # missing but fills through the shared module.
        loaded = model.load_adapter(str(path), set_active=True, use_safetensors=True, loading_info=info)
    if loaded != name or info.get("unexpected_keys"):
        raise SystemExit(f"{path}: reload gave adapter {loaded!r}, unexpected keys {info.get('unexpected_keys')}")
    for i, p in enumerate(prompts):
        tokens, logits = generate(model, p["input_ids"])
        if tokens != runs[i][0] or not torch.equal(logits, runs[i][1]):
            diff = (logits - runs[i][1]).abs().max() if logits.shape == runs[i][1].shape else math.inf
            raise SystemExit(f"{path}: reloaded adapter differs on prompt {i} (max |dlogit| {diff}); "
                             f"{'pickle' if use_pickle else 'safetensors'} load")


def _dist_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _readme(expected: dict) -> str:
    adapters_table = "\n".join(
        f"| `{a['dir']}` | {a['base']} | {a['config_class']} | {a['covers']} | {', '.join(a['files'])} |"
        for a in expected["adapters"].values())
    v = expected["versions"]
    min_margin = MIN_TOP1_MARGIN
    logit_prompts = ", ".join(map(str, ADAPTER_LOGIT_PROMPTS))
    n_cases = len(expected["cases"])
    more_mb = sum(c["steps"] * 384 * 4 for c in expected["cases"] if not c["logits"]) / 1e6
    return f"""# AdapterHub oracle fixtures

Generated by `tests/adapterhub/make_fixtures.py` with AdapterHub `adapters` {v['adapters']}, transformers
{v['transformers']}, torch {v['torch']} (the oracle venv of `tests/adapterhub/oracle_venv.py`). Do not edit by
hand; regenerate from the repo root with

```bash
$(.venv/bin/python -m tests.adapterhub.oracle_venv) tests/adapterhub/make_fixtures.py --out tests/adapterhub/fixtures
```

(`PEFTSERVE_ORACLE_VENV=/path/to/venv` reuses an existing oracle venv.) The output is deterministic for a given
torch version; `pytest -m soak tests/adapterhub/test_fixtures_regenerate.py` regenerates into a temp dir and
compares the tokens with these files.

## Bases

`base_gated` (gated-GELU, untied head, 3 heads x d_kv 8 != d_model 32, 2 encoder / 3 decoder layers) and
`base_relu` (ReLU FFN, tied embeddings, 4 heads, 2 + 2 layers): random weights from a fixed seed,
`save_pretrained` safetensors + `ByT5Tokenizer` (vocab 384). Both load with transformers 5
(`serve.engine.base.load_base`).

## Adapters

Made with AdapterHub itself (`adapters.init(model)`, `model.add_adapter(name, config)`), then every
parameter drawn at random (seeded by the adapter name) so that each component changes the output. The adapter
name inside the files (keys `...adapters.<name>...`, `"name"` in `adapter_config.json`) is the directory name.
Prefix adapters use `bottleneck_size=8` (MAM: 16) instead of AdapterHub's 512 to stay small. An adapter
whose random draw leaves a greedy step decided by less than {min_margin} is redrawn with the next seed
(`seed` in expected.json).

Weights are in `adapter.safetensors`. Where AdapterHub cannot write safetensors (tensors shared between
modules: the prefix pool, held at model level and under every attention layer; `adapter_norm_before` =
`adapter_down.0`), the script saved AdapterHub's `pytorch_adapter.bin` and wrote `adapter.safetensors` itself
with each shared tensor once, under its first key in state-dict order (`peftserve adapters convert` writes the
same file; the first attention layer's key for the pool). `prefix_model_level/` and `mam_model_level/` store the
pool under its model-level key (`prefix_tuning.prefix_tunings.<name>...`, no layer path);
`prefix_save_model/` under the name `safetensors.torch.save_model` keeps when it saves the whole model
(`decoder.block.0.layer.0.SelfAttention.prefix_tuning.pool...`, alphabetically first). AdapterHub's
`load_adapter(use_safetensors=True)` reproduces every adapter from its file (checked by the script). Only
`prefix_tuning/` keeps the `.bin` (input of the convert test). Only `seq_bn/` keeps AdapterHub's prediction-head
files (`head_config.json`, `model_head.safetensors`: the T5 LM head), which the server ignores.

| dir | base | config | covers | files |
| --- | --- | --- | --- | --- |
{adapters_table}

## Expected outputs

`expected.json`: `prompts` (text and ByT5 `input_ids`, EOS included), `bases`, `adapters`, and `cases`: one per
(base or adapter) x prompt, with `tokens` (greedy tokens after the decoder start token), `steps`,
`min_top1_margin` (smallest top-1 minus top-2 logit over the steps) and `full_forward_max_abs_diff` (teacher-
forced full forward vs the incremental logits; nonzero where a gate averages over the decoder sequence).
`expected_logits.safetensors`: `cases[i].case` -> float32 `[steps, 384]` raw logits of each generate step,
for the cases with `"logits": true` (the bases on every prompt, the adapters on prompt {logit_prompts}; all
{n_cases} cases would add {more_mb:.1f} MB).

Reference = AdapterHub's cached `generate` (greedy, `num_beams=1`, `max_new_tokens=6`, `use_cache=True`), each
prompt alone (batch of 1, no padding), the plain base with no active adapter.
"""


if __name__ == "__main__":
    sys.exit(main())
