"""The engine survives what a caller or a model can throw at it mid-batch."""

import asyncio

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
from serve.engine.detokenize import Detokenizer


def test_ids_past_the_tokenizer_vocabulary_decode_to_nothing(tiny_base):
    tok = tiny_base.tokenizer
    known = tok("ok").input_ids[:-1]  # drop EOS
    # FLAN-T5's head has 32,128 logits for 32,100 tokens: a padding id must not fail the row
    detok = Detokenizer(tok)
    assert detok.decode(known + [len(tok), len(tok) + 27]) == detok.decode(known) == "ok"


def test_engine_keeps_serving_after_a_callers_event_loop_closes(tiny_base_dir):
    cfg = EngineConfig(base=str(tiny_base_dir), max_batch_rows=4, max_new_tokens_cap=64)
    with Engine.from_config(cfg) as engine:
        req = GenerationRequest("abandoned", params=GenerationParams(max_new_tokens=64))
        loop = asyncio.new_event_loop()
        loop.create_task(engine.submit(req))
        loop.run_until_complete(asyncio.sleep(0.02))  # the request is running ...
        loop.close()  # ... and its caller's loop is gone before the result comes back
        expected = engine.generate(GenerationRequest("still here", params=GenerationParams(max_new_tokens=8)))
        again = engine.generate(GenerationRequest("still here", params=GenerationParams(max_new_tokens=8)))
        assert expected.generated_tokens == 8 and again.token_ids == expected.token_ids
