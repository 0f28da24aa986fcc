"""peft's seq2seq default (num_transformer_submodules=2) saves a decoder prompt nobody trains or serves; ours is 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import kind_config


def losses(adapter_dir, tiny_base_dir, text: str, target: str) -> tuple[float, float]:
    """(loss as peft trains it, loss of what is served: the encoder soft prompt only, plain decoder)."""
    from peft import PeftModel

    from serve.engine.base import load_base

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


def prompt_gradients(task_files, tiny_base_dir, tmp_path, submodules: int, kind: str = "prompt",
                     **options) -> torch.Tensor:
    """Per-row gradient norm of the soft prompt (P-tuning: of the encoder's virtual-token embedding, its
    input) after one training batch."""
    from serve.engine.base import load_base
    from training import data
    from training.methods import build

    cfg = kind_config(kind, task_files, tiny_base_dir, tmp_path / f"s{submodules}", prompt_submodules=submodules,
                      **options)
    base = load_base(str(tiny_base_dir))
    trainable = build(cfg, base)
    pairs = data.load_pairs(cfg.train, "text", "label", max_samples=8)
    batch = data.collate(data.encode_pairs(base.tokenizer, pairs, 64, 16), base.tokenizer.pad_token_id)
    trainable.model.train()
    trainable.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    weight = trainable.model.prompt_encoder["default"].embedding.weight
    return weight.grad.norm(dim=-1)


def test_peft_default_two_submodules_trains_half_a_prompt_that_is_never_used(task_files, tiny_base_dir, tmp_path):
    """With peft's default (2) the file holds 2n rows; the decoder half never gets a gradient (peft's
    seq2seq forward and generate prepend only the encoder half), so it is untrained weight that doubles
    the adapter and its reported trainable parameters. Ours (1) trains and ships exactly the served rows."""
    ours = prompt_gradients(task_files, tiny_base_dir, tmp_path, 1)
    assert ours.shape == (20,) and bool((ours > 0).all())
    default = prompt_gradients(task_files, tiny_base_dir, tmp_path, 2)
    assert default.shape == (40,)
    assert bool((default[:20] > 0).all()) and bool((default[20:] == 0).all())


def test_encoder_only_prompt_trains_exactly_what_is_served(trained, tiny_base_dir):
    out = trained["prompt"].output
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights["prompt_embeddings"].shape == (20, 128)  # one soft prompt: the encoder's
    peft_loss, served_loss = losses(out, tiny_base_dir, "THE SOUP WAS GREAT.", "loud")
    assert peft_loss == pytest.approx(served_loss, rel=1e-5)


def test_ptuning_two_submodules_trains_or_saves_rows_generation_never_uses(task_files, tiny_base_dir, tmp_path):
    """P-tuning takes peft's same seq2seq path (only the first num_virtual_tokens encoder outputs are
    prepended). With 2: the MLP encodes each row alone, so the decoder rows get exactly zero gradient; the
    bidirectional LSTM mixes rows, so the decoder rows train, but only as context for the encoder rows,
    and their own outputs are saved and never used. With 1 (ours) every row trains and is served."""
    for encoder in ("MLP", "LSTM"):
        ours = prompt_gradients(task_files, tiny_base_dir, tmp_path / encoder, 1, "ptuning", ptuning_encoder=encoder)
        assert ours.shape == (20,) and bool((ours > 0).all()), encoder
        default = prompt_gradients(task_files, tiny_base_dir, tmp_path / encoder, 2, "ptuning",
                                   ptuning_encoder=encoder)
        assert default.shape == (40,) and bool((default[:20] > 0).all()), encoder
        assert bool((default[20:] == 0).all()) == (encoder == "MLP"), encoder


def test_encoder_only_ptuning_trains_exactly_what_is_served(trained, tiny_base_dir):
    out = trained["ptuning"].output
    assert load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"].shape == (20, 128)
    peft_loss, served_loss = losses(out, tiny_base_dir, "THE SOUP WAS GREAT.", "loud")
    assert peft_loss == pytest.approx(served_loss, rel=1e-5)
