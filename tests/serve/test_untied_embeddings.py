"""Regression (issue 12): a checkpoint whose `encoder.embed_tokens.weight` differs from `shared.weight`.

transformers keeps the two apart when both are in the file, and its encoder embeds with
`encoder.embed_tokens`. The engine must too, for base rows and for soft-prompt rows; the oracle is
transformers' own greedy `generate` (with the soft prompt prepended to the encoder's own embeddings).
"""

from __future__ import annotations

import pytest
import torch

from tests.peft_zoo import prompt as save_prompt

INPUTS = ["hello world", "a longer input for the encoder", "xyz"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def untied_base_dir(tmp_path_factory):
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    from serve.engine.base import t5_config

    out = tmp_path_factory.mktemp("untied") / "t5-untied-embeddings"
    torch.manual_seed(3)
    model = T5ForConditionalGeneration(t5_config("tiny"))
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.1)
    model.encoder.embed_tokens = torch.nn.Embedding.from_pretrained(
        torch.randn_like(model.shared.weight) * 3.0, freeze=False)
    model.config.tie_word_embeddings = False
    model.save_pretrained(out, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(untied_base_dir):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(untied_base_dir).eval()
    tok = AutoTokenizer.from_pretrained(untied_base_dir)
    # the precondition of the regression: the file really holds two different embeddings, kept apart
    assert not torch.equal(model.encoder.embed_tokens.weight, model.shared.weight)
    return model, tok


def _hf_greedy(model, tok, text: str, soft_prompt: torch.Tensor | None = None) -> list[int]:
    enc = tok([text], return_tensors="pt")
    embeds = model.get_encoder().embed_tokens(enc.input_ids)
    mask = enc.attention_mask
    if soft_prompt is not None:
        embeds = torch.cat([soft_prompt[None].to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([torch.ones(1, soft_prompt.shape[0], dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             do_sample=False, num_beams=1)
    return out[0, 1:].tolist()  # drop the decoder start token; generate stops after EOS (id 1)


def test_base_and_prompt_rows_match_transformers_generate(untied_base_dir, reference, tmp_path):
    from safetensors.torch import load_file

    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    model, tok = reference
    prompt_dir = save_prompt(model, tmp_path / "prompt", seed=5, num_virtual_tokens=4)
    soft = load_file(str(prompt_dir / "adapter_model.safetensors"))["prompt_embeddings"][:4]

    engine = Engine.from_config(EngineConfig(base=str(untied_base_dir)))
    try:
        engine.register_adapter("soft", prompt_dir)
        params = GenerationParams(max_new_tokens=NEW_TOKENS)
        requests = [GenerationRequest(t, adapter=a, params=params) for t in INPUTS for a in (None, "soft")]
        results = engine.generate(requests)  # base and prompt rows in one batch
    finally:
        engine.close()
    for req, res in zip(requests, results, strict=True):
        expected = _hf_greedy(model, tok, req.inputs, soft if req.adapter else None)
        assert res.token_ids == expected, f"{req.adapter or 'base'} row {req.inputs!r}: {res.token_ids} != {expected}"
