"""HF `generate` as the oracle for decoding features, for any adapter kind.

`hf_generate(model, tok, text, **gen)`: HF's own generate (KV cache and all) on a model (the base, a merged
or a PeftModel adapter). `stepped_generate(step, base, tok, text, **gen)`: HF's generate loop (its beam
search, logits processors, stopping) driven through a model whose forward is `step(ids, dec) -> logits` -
the per-kind references of tests/combination_oracle.py (`model_for`), which is how the prefix-tuning
reference is built: peft's generate drops T5 prefixes, its forward does not. The cache is off, so every
step is a full forward of the reference (slow, exact).

Both run on a fresh thread with one torch thread: beside a live engine (whose loop thread holds an OpenMP
team), a second team on the caller's thread would put more OpenMP threads than cores in the process and
slow every kernel of both (serve/engine/threads.py).
"""

from __future__ import annotations

import copy

import torch
from transformers.modeling_outputs import Seq2SeqLMOutput


def _strip(out: torch.Tensor, pad: int, eos: int) -> list[list[int]]:
    """HF's returned sequences -> generated tokens (decoder start dropped; padding after EOS dropped)."""
    seqs = []
    for row in out.tolist():
        row = row[1:]
        if eos in row:
            row = row[:row.index(eos) + 1]
        seqs.append(row)
    return seqs


def alone(fn):
    """fn's result, computed on a fresh thread with one torch thread (no second OpenMP team)."""
    from serve.engine.threads import run_on_fresh_thread

    def one_thread():
        torch.set_num_threads(1)
        return fn()

    return run_on_fresh_thread(one_thread, name="test-oracle")


def hf_generate(model, tok, text: str, **gen) -> list[list[int]]:
    return alone(lambda: _hf_generate(model, tok, text, **gen))


def stepped_generate(step, base, tok, text: str, **gen) -> list[list[int]]:
    return alone(lambda: _stepped_generate(step, base, tok, text, **gen))


def _hf_generate(model, tok, text: str, **gen) -> list[list[int]]:
    ids = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(input_ids=ids.input_ids, attention_mask=ids.attention_mask, do_sample=False, **gen)
    return _strip(out, model.config.pad_token_id, model.config.eos_token_id)


def _stepped_generate(step, base, tok, text: str, **gen) -> list[list[int]]:
    ids = tok([text], return_tensors="pt").input_ids
    model = copy.deepcopy(base)

    def forward(*args, decoder_input_ids=None, **kwargs):
        with torch.no_grad():
            logits = torch.cat([step(ids, decoder_input_ids[r:r + 1])[:, -1:] for r in range(len(decoder_input_ids))])
        return Seq2SeqLMOutput(logits=logits)

    model.forward = forward
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=False,
                             **gen)
    return _strip(out, model.config.pad_token_id, model.config.eos_token_id)
