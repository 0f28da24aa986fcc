"""OpenAI wire format: request bodies -> engine requests, engine results -> completions / chat completions
(choices, logprobs, stream chunks), and chat messages -> the encoder input through a chat template.

Pure functions (no routing, no backend): serve/app/routes.py calls them.

Chat template: the adapter's own (`peftserve_chat_template` in its adapter_config.json, kept in its registry
record's spec), else DEFAULT_CHAT_TEMPLATE, FLAN-T5's: system messages first (each followed by a blank
line); a single user turn is sent as it is (FLAN-T5 was instruction-tuned on bare instructions); a longer
conversation becomes a "User: ... / Assistant: ..." transcript ending in "Assistant:".
"""

from __future__ import annotations

import uuid

from serve.app.schemas import OPENAI_FINISH

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages if m.role in ('system', 'developer') %}{{ m.content }}\n\n{% endfor %}"
    "{% set turns = messages | rejectattr('role', 'in', ['system', 'developer']) | list %}"
    "{% if turns | length == 1 and turns[0].role == 'user' %}{{ turns[0].content }}"
    "{% else %}{% for m in turns %}{{ 'User' if m.role == 'user' else 'Assistant' }}: {{ m.content }}\n"
    "{% endfor %}Assistant:{% endif %}")


def chat_input(messages: list[dict], record) -> str:
    """The encoder input for a conversation: the adapter's recorded template, or the default."""
    from adapters.chat_template import render

    template = ((record.spec or {}).get("chat_template") if record is not None else None) or DEFAULT_CHAT_TEMPLATE
    return render(template, messages)


def engine_params(req, max_new_tokens: int | None, want_logprobs: bool, top_logprobs: int,
                  best_of: int | None = None) -> dict:
    """GenerationParams (as a dict) for an OpenAI body (completions or chat); ranges are the engine's to check."""
    temperature = 1.0 if req.temperature is None else req.temperature
    beams = req.num_beams or 1
    p = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0 and beams == 1, "temperature": temperature,
         "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": req.top_k or 0, "seed": req.seed,
         "stop": req.stops, "logprobs": want_logprobs, "presence_penalty": req.presence_penalty,
         "frequency_penalty": req.frequency_penalty, "logit_bias": req.logit_bias, "n": req.n,
         "best_of": best_of, "top_n_tokens": top_logprobs, "num_beams": beams,
         "grammar": None if req.response_format is None else req.response_format.engine_dict()}
    for ours, theirs in (("repetition_penalty", "repetition_penalty"), ("min_new_tokens", "min_tokens"),
                         ("typical_p", "typical_p"), ("no_repeat_ngram_size", "no_repeat_ngram_size"),
                         ("length_penalty", "length_penalty"), ("early_stopping", "early_stopping")):
        if getattr(req, theirs) is not None:
            p[ours] = getattr(req, theirs)
    return p


def engine_request(inputs: str, params: dict, adapter: str | None, merged: dict | None, versions: dict) -> dict:
    return {"inputs": inputs, "adapter": adapter, "merged_adapters": merged, "request_id": uuid.uuid4().hex,
            "versions": versions or {}, "params": params}


def outputs_of(result: dict) -> list[dict]:
    """A result's outputs (n, best_of, beams), each {text, finish_reason, generated_tokens, tokens, top_tokens}."""
    return result.get("sequences") or [result]


def completion_logprobs(out: dict) -> dict:
    toks, offset, offsets = out["tokens"], 0, []
    for t in toks:
        offsets.append(offset)
        offset += len(t["text"])
    tops = out.get("top_tokens")
    return {"tokens": [t["text"] for t in toks], "token_logprobs": [t["logprob"] for t in toks],
            "top_logprobs": None if tops is None else [{a["text"]: a["logprob"] for a in alts} for alts in tops],
            "text_offset": offsets}


def completion_choices(results: list[dict], want_logprobs: bool) -> list[dict]:
    choices = []
    for r in results:
        for out in outputs_of(r):
            choices.append({"text": out["text"], "index": len(choices),
                            "finish_reason": OPENAI_FINISH[out["finish_reason"]],
                            "logprobs": completion_logprobs(out) if want_logprobs else None})
    return choices


def _chat_token(t: dict) -> dict:
    return {"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode())}


def chat_logprobs(tokens: list[dict], tops: list | None) -> dict:
    content = []
    for i, t in enumerate(tokens):
        entry = _chat_token(t)
        entry["top_logprobs"] = [_chat_token(a) for a in tops[i]] if tops else []
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_choices(result: dict, want_logprobs: bool) -> list[dict]:
    return [{"index": i, "message": {"role": "assistant", "content": out["text"], "refusal": None},
             "finish_reason": OPENAI_FINISH[out["finish_reason"]],
             "logprobs": chat_logprobs(out["tokens"], out.get("top_tokens")) if want_logprobs else None}
            for i, out in enumerate(outputs_of(result))]


def usage(results: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(out["generated_tokens"] for r in results for out in outputs_of(r))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_chunk(cid: str, created: int, model: str):
    """chunk(output index, token dict or None, its alternatives, finish reason) -> a completions stream chunk."""
    def chunk(index: int, token: dict | None, top: list | None, finish: str | None) -> dict:
        logprobs = None
        if token is not None and token.get("logprob") is not None:
            logprobs = {"tokens": [token["text"]], "token_logprobs": [token["logprob"]],
                        "top_logprobs": None if top is None else [{a["text"]: a["logprob"] for a in top}],
                        "text_offset": None}
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": "" if token is None else token["text"], "index": index, "logprobs": logprobs,
                             "finish_reason": finish}]}
    return chunk


def chat_chunk(cid: str, created: int, model: str):
    """The same for chat: each output's first chunk names the role; content arrives as deltas."""
    started: set[int] = set()

    def chunk(index: int, token: dict | None, top: list | None, finish: str | None) -> dict:
        delta: dict = {}
        if index not in started:  # a choice's first chunk names the role
            started.add(index)
            delta["role"] = "assistant"
        if token is not None:
            delta["content"] = token["text"]
        logprobs = None
        if token is not None and token.get("logprob") is not None:
            logprobs = chat_logprobs([token], None if top is None else [top])
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    return chunk


# engine field -> OpenAI body field, for validation errors
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "grammar": "response_format",
                 "grammar.value": "response_format", "grammar.type": "response_format",
                 "num_return_sequences": "n"}


def openai_field(field: str, chat: bool) -> str:
    name = field[len("params."):] if field.startswith("params.") else field
    if name == "top_n_tokens":
        return "top_logprobs" if chat else "logprobs"
    return OPENAI_FIELDS.get(name, name)
