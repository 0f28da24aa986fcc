"""A base of the bench's shape whose greedy outputs mean something, for agreement measurements (int8 vs float32,
the engine vs CTranslate2).

Why: a random-weight T5's next-token logits are nearly flat (the best of 32,128 random logits beats the second by a
hair), so any rounding flips greedy decoding; on the random flan-t5-small bench base int8 agrees with float32 on
~30 % of positions, against ~85 % on the first token. A trained model's logits are peaked as a real FLAN-T5's
are. The weights of google/flan-t5-* cannot be downloaded here, so the bench trains its own: the random base of
the preset's shape, fully fine-tuned on a synthetic task (recite the sentence a code name stands for; ByT5 bytes,
outputs of 35-69 tokens), `preset.trained_base_steps` AdamW steps, cached under the bench's work dir. Held-out
prompts come from the same generator with another seed.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

# A recitation task: each code name stands for one sentence of 35-69 characters (bytes: tokens); a prompt hides the
# name among filler words. The model must find the name (cross-attention) and then recite its sentence (the
# decoder as a language model): trained T5-small shapes reach a peaked distribution within a few hundred steps,
# where a copy task stays near 1.3 nats per byte for longer than a bench should train.
SENTENCES = (
    "the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump", "sphinx of black quartz, judge my vow",
    "the five boxing wizards jump quickly", "jackdaws love my big sphinx of quartz",
    "a wizard's job is to vex chumps quickly in fog", "waltz, bad nymph, for quick jigs vex",
    "bright vixens jump; dozy fowl quack", "quick zephyrs blow, vexing daft jim",
    "two driven jocks help fax my big quiz", "five quacking zephyrs jolt my wax bed",
    "the job requires extra pluck and zeal from every young wage earner",
    "crazy fredrick bought many very exquisite opal jewels", "we promptly judged antique ivory buckles",
    "a mad boxer shot a quick, gloved jab to the jaw of his dizzy opponent",
)
NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa")
FILLER = ("please", "now", "kindly", "the", "line", "for", "me", "again", "today", "softly", "aloud", "once")
TASK = "recite"
MAX_INPUT_TOKENS = 64


def example(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(NAMES))
    words = [rng.choice(FILLER) for _ in range(rng.randint(0, 4))]
    words.insert(rng.randint(0, len(words)), NAMES[i])
    return f"{TASK}: " + " ".join(words), SENTENCES[i]


def held_out_prompts(seed: int, n: int) -> list[str]:
    """Prompts from another seed: other filler around the names (the sentences are the task itself)."""
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
                task=TASK, fingerprint=fingerprint(model))
    (partial / FINGERPRINT_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path
