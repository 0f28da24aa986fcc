"""Every served kind and method, old and new, with base rows in ONE continuous batch (rows join and leave
between steps), on one device and with the base split in layer groups. Each row's greedy tokens equal the
reference library's repeated-forward decoding for that adapter alone, and the log-probabilities of those
tokens agree within 1e-4. References: peft's PeftModel forward (prompt methods: the encoder prompt, as
peft's generate uses it; prefix tuning: its forward, since its generate drops T5 prefixes); BitFit: dense
math (forward hooks adding the biases)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
from tests.combination_oracle import add_bitfit, greedy
from tests.peft_zoo import adalora, bitfit, dora, ia3, lora, prefix, prompt, ptuning
from tests.serve.engine_helpers import staggered

NEW_TOKENS = 6
INPUTS = ["the quick brown fox", "summarize: engines batch rows", "hello there", "x y z"]


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    root, m = tmp_path_factory.mktemp("all-kinds"), tiny_base.model
    return {"lora": lora(m, root / "lora", 51, r=4, target_modules=["q", "v", "wo"]),
            "dora": dora(m, root / "dora", 52, r=4, target_modules=["q", "k", "v", "o", "wi_0", "wo"]),
            "adalora": adalora(m, root / "adalora", 53),
            "ia3": ia3(m, root / "ia3", 54),
            "bitfit": bitfit(m, root / "bitfit", 7, tiny_base.name),
            "prompt": prompt(m, root / "prompt", 55, 4),
            "ptuning": ptuning(m, root / "ptuning", 56, 5),
            "ptuning_lstm": ptuning(m, root / "ptuning_lstm", 57, 3, encoder="LSTM", num_transformer_submodules=1),
            "prefix": prefix(m, root / "prefix", 58, 6),
            "prefix_proj": prefix(m, root / "prefix_proj", 59, 3, prefix_projection=True, encoder_hidden_size=32)}


def reference(base_model, adapter_dir, tok, text: str):
    """(greedy tokens, log-probabilities) by repeated full forwards of the reference for `adapter_dir`."""
    ids = tok([text], return_tensors="pt").input_ids
    if adapter_dir is None:
        step = lambda dec: base_model(input_ids=ids, decoder_input_ids=dec).logits  # noqa: E731
    elif (adapter_dir / "adapter_config.json").read_text().find('"BITFIT"') >= 0:
        model = copy.deepcopy(base_model)
        add_bitfit(model, adapter_dir)
        step = lambda dec: model(input_ids=ids, decoder_input_ids=dec).logits  # noqa: E731
    else:
        from peft import PeftModel

        pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
        cfg = pm.peft_config["default"]
        if cfg.peft_type.value in ("PROMPT_TUNING", "P_TUNING"):
            embeds = torch.cat((pm.get_prompt(batch_size=1)[:, :cfg.num_virtual_tokens], pm.word_embeddings(ids)), 1)
            step = lambda dec: pm.base_model(inputs_embeds=embeds, decoder_input_ids=dec).logits  # noqa: E731
        else:
            step = lambda dec: pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits  # noqa: E731
    return greedy(step, NEW_TOKENS, base_model.config.eos_token_id)




@pytest.mark.parametrize("split", [False, True], ids=["one-device", "split-groups"])
def test_every_kind_in_one_continuous_batch_matches_its_reference(tiny_base, tiny_base_dir, zoo, split):
    extra = {}
    if split:
        from serve.engine.base import t5_config
        from serve.engine.device_map import plan_device_map

        plan = plan_device_map(t5_config("tiny"), {"group0": 2**20 * 6, "group1": 2**20 * 20}, dtype_bytes=4)
        assert set(plan.values()) == {"group0", "group1"}
        extra["device_map"] = {k: "cpu" for k in plan}
    names = [None, *zoo, None, *zoo]
    reqs = [GenerationRequest(INPUTS[i % len(INPUTS)], adapter=n,
                              params=GenerationParams(max_new_tokens=NEW_TOKENS, logprobs=True))
            for i, n in enumerate(names)]
    cfg = EngineConfig(base=str(tiny_base_dir), max_batch_rows=len(names), max_new_tokens_cap=16,
                       max_input_tokens=64, max_prefix_tokens=8, request_timeout_s=120, ia3_merge="never",
                       device_slots={"lora": 3, "ia3": 1, "bitfit": 1, "prompt": 3, "prefix": 2}, **extra)
    with Engine.from_config(cfg) as engine:
        for name, path in zoo.items():
            engine.register_adapter(name, path)
        methods = {a["name"]: a["method"] for a in engine.adapters()}
        results = asyncio.run(staggered(engine, reqs))
    assert methods == {"lora": "lora", "dora": "dora", "adalora": "adalora", "ia3": "ia3", "bitfit": "bitfit",
                       "prompt": "prompt", "ptuning": "p_tuning", "ptuning_lstm": "p_tuning", "prefix": "prefix",
                       "prefix_proj": "prefix"}
    refs: dict = {}
    for req, res in zip(reqs, results, strict=True):
        key = (req.adapter, req.inputs)
        if key not in refs:
            refs[key] = reference(tiny_base.model, zoo.get(req.adapter), tiny_base.tokenizer, req.inputs)
        tokens, logprobs = refs[key]
        assert res.token_ids == tokens, f"{req.adapter or 'base'} on {req.inputs!r}"
        assert res.logprobs == pytest.approx(logprobs, abs=1e-4), req.adapter
    base_out = {k[1]: v[0] for k, v in refs.items() if k[0] is None}
    differs = {k[0] for k, v in refs.items() if k[0] and k[1] in base_out and v[0] != base_out[k[1]]}
    assert len(differs) >= 5, f"adapters should change greedy outputs; only {sorted(differs)} did"
