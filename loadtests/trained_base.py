"""A base of the bench's shape whose greedy outputs mean something, for agreement measurements (int8 vs float32,
the engine vs CTranslate2).

Why: a random-weight T5's next-token logits are nearly flat (the best of 32,128 random logits beats the second by a
hair), so any rounding flips greedy decoding; on the random flan-t5-small bench base int8 agrees with float32 on
~30 % of positions, against ~85 % on the first token. A trained model's logits are peaked as a real FLAN-T5's
are. The weights of google/flan-t5-* cannot be downloaded here, so the bench trains its own: the random base of
the preset's shape, fully fine-tuned on a synthetic task (copy a sequence of code words in upper case; ByT5
bytes, outputs of 20-60 tokens), `preset.trained_base_steps` AdamW steps, cached under the bench's work dir.
Held-out prompts come from the same generator with another seed.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
         "xray", "yankee", "zulu")
TASK = "shout: "
MAX_INPUT_TOKENS = 64


def example(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    return TASK + words, words.upper()


def held_out_prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [example(rng)[0] for _ in range(n)]


def ensure_trained_base(work: Path, preset, progress=print, batch: int = 32, lr: float = 1e-3) -> Path:
    """The trained base for `preset` (cached). Prints progress every 20 steps with the training loss."""
    import torch

    from serve.engine.base import FINGERPRINT_FILE, build_base, fingerprint, load_base

    path = work / "bases" / f"{preset.base_preset}-trained-{preset.trained_base_steps}"
    if (path / FINGERPRINT_FILE).exists():
        return path
    fresh = build_base(work / "bases" / f"{preset.base_preset}-untrained", preset.base_preset, preset.seed)
    base = load_base(str(fresh))
    model, tok = base.model, base.tokenizer
    model.requires_grad_(True).train()  # load_base hands out a frozen base
    torch.manual_seed(preset.seed)
    rng = random.Random(preset.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    progress(f"training a {preset.base_preset} base on a copy task for the agreement measurements "
             f"({preset.trained_base_steps} steps, once)")
    t0 = time.perf_counter()
    for step in range(preset.trained_base_steps):
        pairs = [example(rng) for _ in range(batch)]
        enc = tok([p for p, _ in pairs], return_tensors="pt", padding=True, truncation=True,
                  max_length=MAX_INPUT_TOKENS)
        labels = tok([t for _, t in pairs], return_tensors="pt", padding=True).input_ids
        labels[labels == tok.pad_token_id] = -100
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == preset.trained_base_steps - 1:
            progress(f"trained base: step {step + 1}/{preset.trained_base_steps}, loss {loss.item():.3f}, "
                     f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    model.config.tie_word_embeddings = False  # transformers 5 flips it on load; the head is its own (as build_base)
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tok.save_pretrained(partial)
    info = json.loads((fresh / FINGERPRINT_FILE).read_text())
    info.update(name=f"peftserve/trained-{preset.base_preset}", trained_steps=preset.trained_base_steps,
                task=TASK.strip(), fingerprint=fingerprint(model))
    (partial / FINGERPRINT_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path
