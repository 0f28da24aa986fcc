"""peft's seq2seq default (num_transformer_submodules=2) trains a decoder prompt nobody serves; ours is 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import kind_config


def losses(adapter_dir, tiny_base_dir, text: str, target: str) -> tuple[float, float]:
    """(loss as peft trains it, loss of what is served: the encoder soft prompt only, plain decoder)."""
    from peft import PeftModel

    from serve.base import load_base

    base = load_base(str(tiny_base_dir))
    model = PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()
    enc = base.tokenizer([text], return_tensors="pt")
    labels = base.tokenizer([target], return_tensors="pt").input_ids
    n = model.peft_config["default"].num_virtual_tokens
    with torch.no_grad():
        trained = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        prompt = load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"][:n]
        embeds = torch.cat([prompt[None], base.model.shared(enc.input_ids)], dim=1)
        mask = torch.cat([torch.ones(1, n, dtype=torch.long), enc.attention_mask], dim=1)
        served = base.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    return float(trained), float(served)


@pytest.fixture(scope="module")
def decoder_prompt_adapter(color_task, tiny_base_dir, tmp_path_factory):
    from training.train import train

    cfg = kind_config("prompt", color_task, tiny_base_dir, tmp_path_factory.mktemp("pt2") / "two",
                      prompt_submodules=2, max_steps=20, stop_at_metric=None)
    return train(cfg).output


def test_encoder_only_prompt_trains_exactly_what_is_served(trained, tiny_base_dir):
    out = trained["prompt"].output
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights["prompt_embeddings"].shape == (20, 128)  # one soft prompt: the encoder's
    peft_loss, served_loss = losses(out, tiny_base_dir, "paint it red", "warm")
    assert peft_loss == pytest.approx(served_loss, rel=1e-5)


def test_peft_default_two_submodules_trains_a_prompt_that_is_never_served(decoder_prompt_adapter, tiny_base_dir):
    weights = load_file(str(decoder_prompt_adapter / "adapter_model.safetensors"))
    assert weights["prompt_embeddings"].shape == (40, 128)  # encoder + an unused decoder prompt
    peft_loss, served_loss = losses(decoder_prompt_adapter, tiny_base_dir, "paint it red", "warm")
    # what was optimised (with the decoder prompt) is not what generation computes
    assert abs(peft_loss - served_loss) > 1e-2
