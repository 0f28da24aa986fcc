"""Greedy decoding of a model being trained (a T5, peft-wrapped or not), as the server decodes by default.

Used by the training loop's evaluation and by recipes that need a model's answers (distill's teacher).
"""

from __future__ import annotations

import torch


def generate(model, tokenizer, sources: list[str], device, max_source_length: int, max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy decoding, as the server does by default.

    Prefix tuning decodes by repeated forwards instead of `model.generate`: peft 0.21.2's generate (with
    transformers 5) drops T5 prefixes and returns the base's tokens, while its forward, which trains the
    prefix and which the server serves, applies them (docs/TRAINING.md).
    """
    decode = _greedy_by_forward if _is_prefix(model) else _greedy_by_generate
    preds = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sources), batch_size):
            enc = tokenizer(sources[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_source_length).to(device)
            preds += tokenizer.batch_decode(decode(model, enc, max_new_tokens), skip_special_tokens=True)
    return [p.strip() for p in preds]


def _is_prefix(model) -> bool:
    return getattr(getattr(model, "active_peft_config", None), "peft_type", None) == "PREFIX_TUNING"  # a str enum


def _greedy_by_generate(model, enc, max_new_tokens: int) -> torch.Tensor:
    return model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)


def _greedy_by_forward(model, enc, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens from full forwards of `model`, decoder_input_ids grown one token at a time (no decoder
    cache), until every row has emitted EOS or max_new_tokens; finished rows continue with padding, as
    generate's. The encoder output of the first forward is reused: the prefix acts only in the decoder."""
    from transformers.modeling_outputs import BaseModelOutput

    c = model.config
    rows = enc["input_ids"].shape[0]
    dec = torch.full((rows, 1), c.decoder_start_token_id, dtype=torch.long, device=enc["input_ids"].device)
    done = torch.zeros(rows, dtype=torch.bool, device=dec.device)
    encoded = None
    for _ in range(max_new_tokens):
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=dec,
                    encoder_outputs=encoded)
        encoded = BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)
        nxt = out.logits[:, -1].argmax(-1).masked_fill(done, c.pad_token_id)
        dec = torch.cat((dec, nxt[:, None]), dim=1)
        done |= nxt == c.eos_token_id
        if bool(done.all()):
            break
    return dec
