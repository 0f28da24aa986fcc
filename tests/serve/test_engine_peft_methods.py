"""DoRA, AdaLoRA and P-tuning through the engine: registered as peft saved them, mixed per row with LoRA,
prompt tuning and base rows in one continuous batch, greedy tokens equal to peft's repeated-forward decoding
(prompt-style methods: the encoder prompt, as peft's generate uses it), also with the base split in groups."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
from tests.peft_zoo import adalora, dora, lora, prompt, ptuning

NEW_TOKENS = 8
INPUTS = ["the quick brown fox", "summarize: engines batch rows", "hello there", "x y z"]
METHODS = ["dora", "adalora", "ptuning", "ptuning_lstm"]


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    root, m = tmp_path_factory.mktemp("methods-zoo"), tiny_base.model
    return {"dora": dora(m, root / "dora", 21, r=4, target_modules=["q", "k", "v", "o", "wi_0", "wo"]),
            "adalora": adalora(m, root / "adalora", 22),
            "ptuning": ptuning(m, root / "ptuning", 23, 5),
            "ptuning_lstm": ptuning(m, root / "ptuning_lstm", 24, 3, encoder="LSTM"),
            "lora": lora(m, root / "lora", 25, r=4),
            "prompt": prompt(m, root / "prompt", 26, 4)}


def config(tiny_base_dir, **kw) -> EngineConfig:
    return EngineConfig(base=str(tiny_base_dir), max_batch_rows=8, max_new_tokens_cap=16, max_input_tokens=64,
                        device_slots={"lora": 3, "ia3": 1, "bitfit": 1, "prompt": 3}, request_timeout_s=60, **kw)


def peft_greedy(base_model, adapter_dir, tok, text: str) -> list[int]:
    """Greedy decoding by repeated full forwards of peft's own model (prompt methods: encoder prompt only)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
    cfg = pm.peft_config["default"]
    ids = tok([text], return_tensors="pt").input_ids
    dec = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            if cfg.is_prompt_learning:
                embeds = torch.cat((pm.get_prompt(batch_size=1)[:, :cfg.num_virtual_tokens], pm.word_embeddings(ids)), 1)
                logits = pm.base_model(inputs_embeds=embeds, decoder_input_ids=dec).logits
            else:
                logits = pm(input_ids=ids, decoder_input_ids=dec).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat((dec, nxt), 1)
            if nxt.item() == base_model.config.eos_token_id:
                break
    return dec[0, 1:].tolist()


def requests() -> list[GenerationRequest]:
    names = [None, *METHODS, "lora", "prompt", *METHODS]
    return [GenerationRequest(INPUTS[i % len(INPUTS)], adapter=n, params=GenerationParams(max_new_tokens=NEW_TOKENS))
            for i, n in enumerate(names)]


async def staggered(engine, reqs):
    first = [asyncio.ensure_future(engine.submit(r)) for r in reqs[::2]]
    await asyncio.sleep(0.03)
    second = [asyncio.ensure_future(engine.submit(r)) for r in reqs[1::2]]
    a, b = await asyncio.gather(*first), await asyncio.gather(*second)
    out = [None] * len(reqs)
    out[::2], out[1::2] = a, b
    return out


@pytest.mark.parametrize("split", [False, True], ids=["one-device", "split-groups"])
def test_new_methods_mixed_continuous_equal_peft_greedy(tiny_base, tiny_base_dir, zoo, split):
    extra = {}
    if split:
        from serve.engine.base import t5_config
        from serve.engine.device_map import plan_device_map

        plan = plan_device_map(t5_config("tiny"), {"group0": 2**20 * 6, "group1": 2**20 * 20}, dtype_bytes=4)
        assert set(plan.values()) == {"group0", "group1"}
        extra["device_map"] = {k: "cpu" for k in plan}
    with Engine.from_config(config(tiny_base_dir, **extra)) as engine:
        for name, path in zoo.items():
            engine.register_adapter(name, path)
        listed = {a["name"]: a for a in engine.adapters()}
        assert listed["dora"]["kind"] == "lora" and listed["ptuning"]["kind"] == "prompt"
        reqs = requests()
        together = asyncio.run(staggered(engine, reqs))
    expected: dict = {}
    for req, res in zip(reqs, together, strict=True):
        key = (req.adapter, req.inputs)
        if key not in expected:
            expected[key] = (peft_greedy(tiny_base.model, zoo[req.adapter], tiny_base.tokenizer, req.inputs)
                             if req.adapter else None)
        if req.adapter is None:
            continue
        assert res.token_ids == expected[key], f"{req.adapter} on {req.inputs!r}"
    base_tokens = {r.inputs: t.token_ids for r, t in zip(reqs, together, strict=True) if r.adapter is None}
    changed = [r.adapter for r, t in zip(reqs, together, strict=True)
               if r.adapter in METHODS and r.inputs in base_tokens and t.token_ids != base_tokens[r.inputs]]
    assert changed, "the new methods should change some greedy outputs"
