"""Trained adapters load in peft's own PeftModel.from_pretrained and give the server engine's logits.

Every peft method the trainer writes (LoRA, DoRA, AdaLoRA, (IA)3, prompt, P-tuning, prefix) is registered with
the server's engine as saved, and peft's reading of the same directory must give the engine's greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.training.conftest import KINDS

INPUTS = ["THE SOUP WAS GREAT.", "the hotel was awful.", "MY NEW BIKE WAS LOUSY.", "her song was lovely."]


@pytest.fixture(scope="module")
def engine(trained, tiny_base_dir):
    from serve.engine import Engine, EngineConfig

    eng = Engine.from_config(EngineConfig(base=str(tiny_base_dir), max_batch_rows=8, max_new_tokens_cap=16,
                                          max_input_tokens=64, request_timeout_s=120))
    for kind in KINDS:
        eng.register_adapter(kind, trained[kind].output)
    yield eng
    eng.close()


def served(engine, kind: str):
    from serve.engine import GenerationParams, GenerationRequest

    reqs = [GenerationRequest(text, adapter=kind, params=GenerationParams(max_new_tokens=8, logprobs=True))
            for text in INPUTS]
    return engine.generate(reqs)


def teacher_forced_logprobs(model, tokenizer, text: str, token_ids: list[int]) -> tuple[list[float], list[int]]:
    """Logprob of each served token and the greedy argmax, from one forward pass of `model`."""
    enc = tokenizer([text], return_tensors="pt")
    decoder_input_ids = torch.tensor([[0, *token_ids[:-1]]])
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       decoder_input_ids=decoder_input_ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return lp[torch.arange(len(token_ids)), torch.tensor(token_ids)].tolist(), lp.argmax(-1).tolist()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "bitfit"])
def test_peft_from_pretrained_gives_the_engines_logits(kind, trained, engine, tiny_base_dir):
    from peft import PeftModel

    from serve.engine.base import load_base

    base = load_base(str(tiny_base_dir))
    model = PeftModel.from_pretrained(base.model, str(trained[kind].output)).eval()
    for text, result in zip(INPUTS, served(engine, kind), strict=True):
        peft_lp, greedy = teacher_forced_logprobs(model, base.tokenizer, text, result.token_ids)
        assert result.token_ids == greedy, (kind, text)
        assert result.logprobs == pytest.approx(peft_lp, abs=2e-4), (kind, text)
        if kind == "prefix":  # peft's generate drops T5 prefixes (test_prefix.py); its forward is the oracle
            continue
        # and peft's own generate agrees with the engine's text
        enc = base.tokenizer([text], return_tensors="pt")
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=8)
        assert base.tokenizer.decode(out[0], skip_special_tokens=True).strip() == result.text.strip()


def test_bitfit_served_logits_equal_the_trained_model(trained, engine, tiny_base_dir):
    from safetensors.torch import load_file

    from serve.engine.base import load_base
    from training.methods import add_biases

    base = load_base(str(tiny_base_dir))
    tensors = load_file(str(trained["bitfit"].output / "adapter_model.safetensors"))
    paths = [k.removeprefix("base_model.model.").removesuffix(".bias") for k in tensors]
    add_biases(base.model, paths)
    with torch.no_grad():
        for p in paths:
            base.model.get_submodule(p).bias.copy_(tensors[f"base_model.model.{p}.bias"])
    for text, result in zip(INPUTS, served(engine, "bitfit"), strict=True):
        lp, greedy = teacher_forced_logprobs(base.model.eval(), base.tokenizer, text, result.token_ids)
        assert result.token_ids == greedy
        assert result.logprobs == pytest.approx(lp, abs=2e-4)
