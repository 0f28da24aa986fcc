"""Benchmark inputs: a random-weight base, random adapters written by real peft, random prompts.

Adapters are created once per (base, kind, rank) and cached on disk: peft builds the adapter
structure on a fresh copy of the base (`init_lora_weights=False`, i.e. random A and B), then every
further adapter re-draws the same tensors from its own seed and is saved with `save_pretrained`
(safetensors). BitFit has no peft method; its files come from the adapters package's own writer.

The methods section adds three more peft methods, written the same way:
- dora: the LoRA adapter (all linear, random A and B) with `use_dora=True`; each module's magnitude
  vector is redrawn after A and B as ||W + s·B·A|| per output row times (1 + 0.05·randn): a well
  conditioned adapter whose per-row scale stays near 1, as after training;
- adalora: `AdaLoraConfig(init_r=target_r=rank)` on every T5 block linear, random A, B and E (no pruning:
  every module keeps rank r, which is what the engine folds into plain LoRA);
- ptuning: `PromptEncoderConfig` (MLP encoder, hidden 128) with the encoder redrawn; `save_pretrained`
  writes the encoder's output as the soft prompt.
"""

from __future__ import annotations

import json
import random
import shutil
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "bench_manifest.json"


@dataclass(frozen=True)
class Request:
    """One benchmark request: the same object is handed to every peer."""

    text: str
    adapter: str | None
    max_new_tokens: int
    # several adapters on the row instead of `adapter`: (ids, weights, merge strategy); engine peer only
    merged: tuple | None = None


def ensure_base(work: Path, base_preset: str, seed: int = 0) -> Path:
    """The random-weight base for a preset, built once under `work/bases/<preset>-bench`.

    Two LM-head edits make a random model behave like a served one; every peer gets the same base and
    the head still computes every logit, so the cost of a step is unchanged:
    - the EOS row is zeroed: a random model otherwise stops some rows after a token or two, and peers
      would be compared on different amounts of work (greedy now runs to max_new_tokens);
    - only the byte tokens of the (ByT5) tokenizer keep their rows: a random head otherwise picks ids
      the tokenizer cannot decode (the flan-t5 shapes have 32,128 logits, ByT5 has 259 byte ids).
    The zeroed logits are exactly 0 while the best of ~256 random logits is positive.
    """
    from serve.engine.base import FINGERPRINT_FILE, build_base

    path = work / "bases" / f"{base_preset}-bench"
    if not (path / FINGERPRINT_FILE).exists():
        print(f"[bench] building a random {base_preset} base at {path}", flush=True)
        build_base(path, base_preset, seed)
        _restrict_head(path)
    return path


BYTE_IDS = range(3, 259)  # ByT5: 0 pad, 1 eos, 2 unk, then the 256 bytes


def _restrict_head(path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import T5ForConditionalGeneration

    from serve.engine.base import FINGERPRINT_FILE, fingerprint

    meta_file = path / FINGERPRINT_FILE
    meta = json.loads(meta_file.read_text())
    from safetensors import safe_open

    def holds_head(file: Path) -> bool:
        with safe_open(str(file), "pt") as f:
            return "lm_head.weight" in f.keys()

    weights_file = next(f for f in sorted(path.glob("*.safetensors")) if holds_head(f))  # sharded for XL
    tensors = load_file(str(weights_file))
    head = tensors["lm_head.weight"]
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[BYTE_IDS.start:BYTE_IDS.stop] = True
    head[~keep] = 0
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    model = T5ForConditionalGeneration.from_pretrained(str(path))
    meta["fingerprint"] = fingerprint(model)  # adapters validate against the modified weights
    meta["name"] += "-bench"
    meta_file.write_text(json.dumps(meta, indent=2))


def random_texts(n: int, chars: int, seed: int) -> list[str]:
    """n prompts of exactly `chars` printable characters (= tokens for the byte-level tokenizer)."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "      "
    return [("".join(rng.choice(alphabet) for _ in range(chars - 1)) + ".")[:chars] for _ in range(n)]


def adapter_name(kind: str, i: int) -> str:
    return f"{kind}-{i:05d}"


def make_adapters(base_dir: Path, out: Path, kind: str, count: int, rank: int = 16, prompt_tokens: int = 8,
                  seed: int = 0, progress: Callable[[str], None] | None = None) -> list[Path]:
    """`count` adapters of `kind` for the base in `base_dir`, under `out/<kind>-r<rank>/`; cached."""
    root = out / f"{kind}-r{rank}-p{prompt_tokens}"
    paths = [root / adapter_name(kind, i) for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not (p / MANIFEST).exists()]
    if not missing:
        return paths
    from serve.engine.base import load_base

    model = load_base(str(base_dir)).model
    writer = _writer(kind, model, rank, prompt_tokens)
    for n, i in enumerate(missing):
        torch.manual_seed(seed * 1_000_003 + i)
        tmp = paths[i].with_name(paths[i].name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        writer(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "index": i, "seed": seed, "rank": rank}))
        shutil.rmtree(paths[i], ignore_errors=True)
        tmp.rename(paths[i])  # a half-written adapter is never visible under its name
        if progress and (n + 1) % 16 == 0:
            progress(f"{kind}: {n + 1}/{len(missing)} adapters written")
    return paths


PREFIX_TOKENS = 20


# AdapterHub kinds the bench serves (issue 14): the configs AdapterHub's own SeqBnConfig / UniPELTConfig make
ADAPTERHUB_KINDS = ("seq_bn", "unipelt")
UNIPELT_PREFIX_TOKENS = 10  # UniPELTConfig's prefix_length
UNIPELT_LORA_RANK = 8  # and its LoRA rank


def _writer(kind: str, model, rank: int, prompt_tokens: int) -> Callable[[Path], None]:
    if kind == "bitfit":
        return _bitfit_writer(model)
    if kind in ADAPTERHUB_KINDS:
        return _adapterhub_writer(kind, model)
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
    )

    if kind in ("lora", "dora"):
        config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=rank, lora_alpha=2 * rank,
                            target_modules="all-linear", init_lora_weights=False, use_dora=kind == "dora")
    elif kind == "adalora":
        config = None  # built below: "all-linear" where this peft's AdaLoRA accepts it
    elif kind == "ia3":
        config = IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, init_ia3_weights=False)
    elif kind == "prompt":
        config = PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt_tokens)
    elif kind == "ptuning":
        config = PromptEncoderConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt_tokens,
                                     encoder_hidden_size=128)
    elif kind == "prefix":  # issue 13 states its target at 20 virtual tokens
        # token_dim = heads x d_kv: peft's default (d_model) only fits T5 shapes where they agree, and
        # flan-t5-small's do not (6 x 64 = 384, d_model 512)
        c = model.config
        config = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=PREFIX_TOKENS,
                                    token_dim=c.num_heads * c.d_kv, num_attention_heads=c.num_heads)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    peft_model = _adalora_model(model, rank) if kind == "adalora" else get_peft_model(model, config)
    d_model = model.config.d_model

    def write(path: Path) -> None:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    # what peft's init_lora_weights=False does: nn.Linear's default init for A and B
                    torch.nn.init.kaiming_uniform_(p, a=5**0.5)
                elif "lora_E" in name:  # AdaLoRA's singular values (peft initialises them to 0)
                    p.copy_(torch.randn_like(p))
                elif "ia3_l" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))  # trained (IA)3 vectors stay near 1
                elif "prompt_encoder" in name and kind == "ptuning" and p.dim() == 2 and "embedding" not in name:
                    p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)  # encoder MLP: unit gain per layer
                elif "prompt_encoder" in name and kind == "prefix":
                    p.copy_(torch.randn_like(p))  # key/value scale, like the base's own keys
                elif "prompt_encoder" in name:
                    p.copy_(torch.randn_like(p) * (d_model**-0.5 if p.dim() == 2 else 0.01))
            if kind == "dora":
                redraw_dora_magnitudes(peft_model)
        peft_model.save_pretrained(path, safe_serialization=True)

    return write


def _adapterhub_writer(kind: str, model) -> Callable[[Path], None]:
    """AdapterHub-format adapters written by the training side's own modules (no AdapterHub import: it pins
    transformers 4.57): AdapterHub's default initialisation, with LoRA's B drawn too so no term is zero."""
    import copy

    from training.adapterhub import config as ah
    from training.adapterhub import layout
    from training.adapterhub.modules import attach

    if kind == "seq_bn":
        config = ah.bottleneck("seq_bn", None)
    else:
        config = ah.union({**copy.deepcopy(ah.PREFIX), "prefix_length": UNIPELT_PREFIX_TOKENS, "use_gating": True},
                          ah.bottleneck("seq_bn", None, use_gating=True),
                          {**copy.deepcopy(ah.LORA), "r": UNIPELT_LORA_RANK, "alpha": 2, "use_gating": True})

    def write(path: Path) -> None:
        adapted = copy.deepcopy(model).requires_grad_(False)
        attach(adapted, config, path.name.removesuffix(".partial"))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if p.requires_grad and name.endswith("lora_B"):
                    p.normal_(0.0, 0.02)
        path.mkdir(parents=True, exist_ok=True)
        layout.save(path, adapted, config, path.name.removesuffix(".partial"), "bench-base")

    return write


def _adalora_model(model, rank: int):
    """AdaLoRA at rank r everywhere (init_r = target_r: nothing to prune) on every T5 block linear."""
    from peft import AdaLoraConfig, TaskType, get_peft_model

    from adapters.kinds import T5_TARGETS

    def config(targets):
        return AdaLoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, init_r=rank, target_r=rank, lora_alpha=2 * rank,
                             total_step=10, target_modules=targets)

    try:
        return get_peft_model(model, config("all-linear"))
    except (ValueError, TypeError):  # an AdaLoRA without the shorthand: the T5 block linears by name
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        return get_peft_model(model, config([t for t in T5_TARGETS if t in present]))


def redraw_dora_magnitudes(peft_model, spread: float = 0.05) -> None:
    """m = ||W + s·B·A|| per output row x (1 + spread·randn): DoRA's per-row scale m / ||W + s·B·A|| near 1,
    as in a trained adapter (peft's init takes the norm with the init B, before B is redrawn)."""
    for module in peft_model.modules():
        magnitude = getattr(module, "lora_magnitude_vector", None)
        if magnitude is None or "default" not in magnitude:
            continue
        w = module.base_layer.weight + module.scaling["default"] * (
            module.lora_B["default"].weight @ module.lora_A["default"].weight)
        norm = w.norm(dim=1)
        magnitude["default"].weight.copy_(norm * (1 + spread * torch.randn_like(norm)))


def _bitfit_writer(model) -> Callable[[Path], None]:
    """BitFit (no peft method): a bias on every T5 block linear, written by the project's one BitFit writer."""
    from training.methods import save_bitfit

    shapes = {name: m.out_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".block." in name}

    def write(path: Path) -> None:
        save_bitfit(path, {name: torch.randn(n) * 0.02 for name, n in shapes.items()}, "bench")

    return write


def make_requests(texts: list[str], adapters: list[str | None], new_tokens: int) -> list[Request]:
    """Row i gets text i and adapter i mod len(adapters): N distinct adapters spread evenly over rows."""
    return [Request(t, adapters[i % len(adapters)], new_tokens) for i, t in enumerate(texts)]
