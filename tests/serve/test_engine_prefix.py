"""Prefix tuning on T5 shapes whose decoder depth differs from the encoder's (the all-kinds batch test,
tests/serve/test_engine_all_kinds.py, covers the usual shape). Oracle: peft's forward (its generate drops T5
prefixes), greedy by repeated full forwards; log-probabilities of the chosen tokens within 1e-4."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
from tests.peft_zoo import prefix
from tests.serve.engine_helpers import staggered

NEW_TOKENS = 8
INPUTS = ["the quick brown fox", "summarize: engines batch rows", "hello there", "x y z"]


def peft_reference(base_model, adapter_dir, tok, text: str):
    """(greedy tokens, their log-probabilities) by repeated forwards of peft's own model."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
    ids = tok([text], return_tensors="pt").input_ids
    dec = torch.zeros(1, 1, dtype=torch.long)
    logprobs = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0, -1]
            nxt = int(out.argmax())
            logprobs.append(float(torch.log_softmax(out.float(), -1)[nxt]))
            dec = torch.cat((dec, torch.tensor([[nxt]])), 1)
            if nxt == base_model.config.eos_token_id:
                break
    return dec[0, 1:].tolist(), logprobs


def base_greedy(base_model, tok, text: str) -> list[int]:
    ids = tok([text], return_tensors="pt").input_ids
    with torch.no_grad():
        return base_model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, 1:].tolist()




def run_mixed(base_dir, zoo, names):
    cfg = EngineConfig(base=str(base_dir), max_batch_rows=6, max_new_tokens_cap=16, max_input_tokens=64,
                       device_slots={"lora": 2, "ia3": 1, "bitfit": 1, "prompt": 2, "prefix": 2},
                       max_prefix_tokens=8, request_timeout_s=60)
    reqs = [GenerationRequest(INPUTS[i % len(INPUTS)], adapter=n,
                              params=GenerationParams(max_new_tokens=NEW_TOKENS, logprobs=True))
            for i, n in enumerate(names)]
    with Engine.from_config(cfg) as engine:
        for name, path in zoo.items():
            engine.register_adapter(name, path)
        listed = {a["name"]: a for a in engine.adapters()}
        together = asyncio.run(staggered(engine, reqs))
    return reqs, together, listed


def check(reqs, results, zoo, base, tok):
    refs = {}
    for req, res in zip(reqs, results, strict=True):
        key = (req.adapter, req.inputs)
        if req.adapter is None:
            assert res.token_ids == base_greedy(base, tok, req.inputs)
            continue
        if not str(req.adapter).startswith("prefix"):
            continue
        if key not in refs:
            refs[key] = peft_reference(base, zoo[req.adapter], tok, req.inputs)
        tokens, logprobs = refs[key]
        assert res.token_ids == tokens, f"{req.adapter} on {req.inputs!r}"
        assert res.logprobs == pytest.approx(logprobs, abs=1e-4), req.adapter
    changed = [k for k, (t, _) in refs.items() if t != base_greedy(base, tok, k[1])]
    assert changed, "the prefixes should change some greedy outputs"


def _uneven_base(tmp_path, enc: int, dec: int):
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    from serve.engine.base import t5_config

    cfg = t5_config("tiny")
    cfg.num_layers, cfg.num_decoder_layers = enc, dec
    torch.manual_seed(4)
    model = T5ForConditionalGeneration(cfg).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.1)
    base_dir = tmp_path / f"t5-{enc}-{dec}"
    model.save_pretrained(base_dir)
    ByT5Tokenizer().save_pretrained(base_dir)
    return base_dir, T5ForConditionalGeneration.from_pretrained(base_dir).eval(), ByT5Tokenizer()


def test_prefix_on_a_decoder_shallower_than_its_encoder(tmp_path):
    """peft sizes the prefix by the encoder's depth; the decoder uses the first layers' worth of it."""
    base_dir, model, tok = _uneven_base(tmp_path, 3, 2)
    zoo = {"prefix4": prefix(model, tmp_path / "prefix4", 41, 4)}
    reqs, results, _ = run_mixed(base_dir, zoo, ["prefix4", None, "prefix4", "prefix4"])
    check(reqs, results, zoo, model, tok)


def test_prefix_on_a_decoder_deeper_than_its_encoder_is_refused(tmp_path):
    """peft's own forward fails there (its cache has num_layers entries, the decoder asks for more): the
    adapter computes nothing defined, so registration says so instead of inventing a meaning."""
    from adapters import AdapterMismatchError

    base_dir, model, _ = _uneven_base(tmp_path, 2, 3)
    path = prefix(model, tmp_path / "prefix4", 41, 4)
    with Engine.from_config(EngineConfig(base=str(base_dir), device_slots={"prefix": 1})) as engine:
        with pytest.raises(Exception) as err:
            engine.register_adapter("p", path)
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, AdapterMismatchError) or "decoder" in str(err.value)
    assert "3 decoder layers" in str(err.value) and "num_layers=2" in str(err.value)
