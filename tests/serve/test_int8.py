"""The int8 base (`dtype: int8`, serve/engine/int8.py): per-row 8-bit activations (a row's quantization never
depends on its batch-mates), float32 adapters per row on top, and the reference it must equal: the same
quantized base under PEFT's own adapter forward (QLoRA-style: peft's LoRA layers around the int8 linears)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
from serve.engine.errors import ConfigError
from serve.engine.int8 import Int8Linear, quantize_linears
from tests.combination_oracle import greedy
from tests.peft_zoo import ia3, lora, prefix, prompt
from tests.serve.engine_helpers import staggered

NEW_TOKENS = 6
INPUTS = ["the quick brown fox", "summarize: engines batch rows", "hello there", "x y z"]


def test_int8_linear_quantizes_each_row_on_its_own():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.normal_(generator=g)
        lin.bias.normal_(generator=g)
    q = Int8Linear(lin)
    # rows of very different sizes: one range per call would leave the small rows a few levels
    x = torch.randn(6, 64, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 0.0, 3.0, 1e4])[:, None]
    y, ref = q(x), lin(x).detach()
    for i in range(6):
        scale = ref[i].abs().max().clamp_min(1e-6)
        assert (y[i] - ref[i]).abs().max() <= 0.03 * scale + 1e-6, f"row {i}"
    # each row alone gives its batch's result (to float rounding: oneDNN picks kernels by row count); leading
    # dimensions are kept
    for i in range(6):
        torch.testing.assert_close(q(x[i:i + 1]), y[i:i + 1], rtol=1e-6, atol=1e-6 * y[i].abs().max().item())
    assert torch.equal(q(x.view(2, 3, 64)), y.view(2, 3, 48))
    # a call larger than the kept scratch buffer (a long encoder pass) quantizes the same way, and a later small
    # call still finds its +1/-1 span rows intact
    big = torch.cat([x, torch.randn(5000, 64, generator=g)])
    torch.testing.assert_close(q(big)[:6], y, rtol=1e-6, atol=1e-6 * y.abs().max().item())
    assert torch.equal(q(x), y)
    assert torch.allclose(q.weight, lin.weight, atol=lin.weight.abs().max().item() / 127)
    assert q.nbytes() < lin.weight.numel() * 4 / 3.5


def _quantized_reference(model):
    """The bare HF model with every linear int8 (the reference's base): quantize_linears on a copy."""
    ref = copy.deepcopy(model)
    quantize_linears(ref)
    assert not any(type(m) is torch.nn.Linear for m in ref.modules())
    return ref


def _peft_on_int8(base_model, adapter_dir):
    """PEFT's own adapter forward around the int8 base linears: PeftModel on the float model, then each
    adapter layer's base_layer swapped for its int8 twin (LoRA/(IA)3 keep their float weights)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
    for path, module in list(pm.named_modules()):
        if type(module) is torch.nn.Linear and not any(k in path for k in ("lora_", "ia3_", "prompt_encoder")):
            parent, _, attr = path.rpartition(".")
            setattr(pm.get_submodule(parent), attr, Int8Linear(module))
    return pm


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    root, m = tmp_path_factory.mktemp("int8-zoo"), tiny_base.model
    return {"lora": lora(m, root / "lora", 61, r=4, target_modules=["q", "v", "wo"]),
            "ia3": ia3(m, root / "ia3", 62),
            "prompt": prompt(m, root / "prompt", 63, 4),
            "prefix": prefix(m, root / "prefix", 64, 5)}


def _reference(tiny_base, adapter_dir, text):
    tok = tiny_base.tokenizer
    ids = tok([text], return_tensors="pt").input_ids
    if adapter_dir is None:
        model = _quantized_reference(tiny_base.model)
        return greedy(lambda dec: model(input_ids=ids, decoder_input_ids=dec).logits, NEW_TOKENS, 1)
    pm = _peft_on_int8(tiny_base.model, adapter_dir)
    cfg = pm.peft_config["default"]
    if cfg.peft_type.value == "PROMPT_TUNING":
        embeds = torch.cat((pm.get_prompt(batch_size=1)[:, :cfg.num_virtual_tokens], pm.word_embeddings(ids)), 1)
        return greedy(lambda dec: pm.base_model(inputs_embeds=embeds, decoder_input_ids=dec).logits, NEW_TOKENS, 1)
    return greedy(lambda dec: pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits,
                  NEW_TOKENS, 1)


def test_every_kind_on_the_int8_base_matches_peft_on_the_same_int8_base(tiny_base, tiny_base_dir, zoo):
    names = [None, *zoo, None, *zoo]
    reqs = [GenerationRequest(INPUTS[i % len(INPUTS)], adapter=n,
                              params=GenerationParams(max_new_tokens=NEW_TOKENS, logprobs=True))
            for i, n in enumerate(names)]
    cfg = EngineConfig(base=str(tiny_base_dir), dtype="int8", max_batch_rows=len(names), max_new_tokens_cap=16,
                       max_input_tokens=64, max_prefix_tokens=8, request_timeout_s=120,
                       device_slots={"lora": 2, "ia3": 1, "prompt": 1, "prefix": 1})
    with Engine.from_config(cfg) as engine:
        info = engine.info()
        for name, path in zoo.items():
            engine.register_adapter(name, path)
        results = asyncio.run(staggered(engine, reqs))
        alone = {(r.adapter, r.inputs): engine.generate(r) for r in reqs[:len(zoo) + 1]}
    assert info["dtype"] == "int8"
    assert info["optimizations"]["int8_linears"] == sum(1 for m in tiny_base.model.modules()
                                                        if type(m) is torch.nn.Linear)
    assert info["optimizations"]["int8_weight_bytes"] < info["optimizations"]["float_weight_bytes"] / 3.5
    refs: dict = {}
    for req, res in zip(reqs, results, strict=True):
        key = (req.adapter, req.inputs)
        if key in alone:  # the row in a mixed, changing batch = the row alone (tolerance: see below)
            assert res.token_ids == alone[key].token_ids
            assert res.logprobs == pytest.approx(alone[key].logprobs, abs=5e-2), key
        if key not in refs:
            refs[key] = _reference(tiny_base, zoo.get(req.adapter), req.inputs)
        tokens, logprobs = refs[key]
        assert res.token_ids == tokens, f"{req.adapter or 'base'} on {req.inputs!r}"
        # Not 1e-4 as in float32: the two sides compute attention and norms in different orders (and a padded
        # batch sums in other blocks than a row alone), and a float rounding apart can move an activation
        # across an 8-bit rounding boundary (one level: ~0.4 % of the row's range), which later layers carry
        # on. Same tokens, log-probabilities within 0.05.
        assert res.logprobs == pytest.approx(logprobs, abs=5e-2), req.adapter


def test_int8_refuses_cuda_and_dedicated_merges(tiny_base_dir):
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(base=str(tiny_base_dir), dtype="int8", device="cuda")
    with pytest.raises(ValueError, match="per row"):
        EngineConfig(base=str(tiny_base_dir), dtype="int8", ia3_merge="dedicated", dedicated_adapter="x")
    assert issubclass(ConfigError, Exception)
