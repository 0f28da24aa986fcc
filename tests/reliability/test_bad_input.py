"""Bad input over real HTTP: every case gets a 4xx whose message names the problem; 0 responses are 5xx; the
server stays healthy. Valid-but-unusual text (NUL, RTL, emoji, combining marks) is served, not refused."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest

from .harness import AUTH, bump, gen, record

J = {"Content-Type": "application/json"}


@dataclass
class Case:
    id: str
    path: str
    body: bytes | str | None
    status: int
    needle: str  # must appear in the error message or field (case-insensitive)
    method: str = "POST"
    headers: dict = field(default_factory=lambda: dict(J))


def tgi(params: dict | None = None, **top) -> str:
    body = {"inputs": "translate: hello", **top}
    if params is not None:
        body["parameters"] = params
    return json.dumps(body)


def oai(**fields) -> str:
    return json.dumps({"model": "lora-a", "prompt": "hello", **fields})


CASES = [
    # malformed / non-object JSON
    Case("truncated-json", "/generate", '{"inputs": "x", "parameters": {', 422, "malformed json"),
    Case("not-json", "/generate", "hello there", 422, "json"),
    Case("json-array", "/generate", "[1, 2, 3]", 422, "body"),
    Case("json-null", "/generate", "null", 422, "body"),
    Case("empty-body", "/generate", "", 422, "body"),
    Case("invalid-utf8", "/generate", b'{"inputs": "\xff\xfe\xfd"}', 422, "body"),
    Case("deeply-nested", "/generate", '{"inputs": ' + "[" * 5000 + "]" * 5000 + "}", 422, ""),
    Case("trailing-garbage", "/generate", '{"inputs": "x"} {"inputs": "y"}', 422, "json"),
    # missing fields / wrong types
    Case("missing-inputs", "/generate", '{"parameters": {}}', 422, "inputs"),
    Case("inputs-int", "/generate", '{"inputs": 5}', 422, "inputs"),
    Case("inputs-list", "/generate", '{"inputs": ["a", "b"]}', 422, "inputs"),
    Case("inputs-null", "/generate", '{"inputs": null}', 422, "inputs"),
    Case("inputs-empty", "/generate", '{"inputs": ""}', 422, "inputs"),
    Case("parameters-string", "/generate", '{"inputs": "x", "parameters": "fast"}', 422, "parameters"),
    Case("unknown-top-level", "/generate", tgi(bogus=1), 422, "bogus"),
    Case("unknown-param", "/generate", tgi({"no_such_param": 1}), 422, "no_such_param"),
    Case("stream-not-bool", "/generate", tgi(stream="maybe"), 422, "stream"),
    Case("do-sample-int", "/generate", tgi({"do_sample": 5}), 422, "do_sample"),
    Case("adapter-id-int", "/generate", tgi({"adapter_id": 5}), 422, "adapter_id"),
    # out-of-range generation parameters
    Case("max-new-tokens-str", "/generate", tgi({"max_new_tokens": "many"}), 422, "max_new_tokens"),
    Case("max-new-tokens-0", "/generate", tgi({"max_new_tokens": 0}), 422, "max_new_tokens"),
    Case("max-new-tokens-neg", "/generate", tgi({"max_new_tokens": -5}), 422, "max_new_tokens"),
    Case("max-new-tokens-over-cap", "/generate", tgi({"max_new_tokens": 100000}), 422, "max_new_tokens"),
    Case("max-new-tokens-2e70", "/generate", tgi({"max_new_tokens": 2**70}), 422, "max_new_tokens"),
    Case("max-new-tokens-float", "/generate", tgi({"max_new_tokens": 3.5}), 422, "max_new_tokens"),
    Case("temperature-neg", "/generate", tgi({"temperature": -1}), 422, "temperature"),
    Case("temperature-nan", "/generate", '{"inputs": "x", "parameters": {"temperature": NaN}}', 422, "temperature"),
    Case("temperature-inf", "/generate", '{"inputs": "x", "parameters": {"temperature": 1e999}}', 422,
         "temperature"),
    Case("top-p-0", "/generate", tgi({"top_p": 0}), 422, "top_p"),
    Case("top-p-1.5", "/generate", tgi({"top_p": 1.5}), 422, "top_p"),
    Case("top-k-0", "/generate", tgi({"top_k": 0}), 422, "top_k"),
    Case("seed-neg", "/generate", tgi({"seed": -1}), 422, "seed"),
    Case("seed-2e64", "/generate", tgi({"seed": 2**64}), 422, "seed"),
    Case("stop-9", "/generate", tgi({"stop": ["a"] * 9}), 422, "stop"),
    Case("stop-5-over-engine", "/generate", tgi({"stop": list("abcde")}), 422, "stop"),
    Case("stop-empty-string", "/generate", tgi({"stop": [""]}), 422, "stop"),
    Case("stop-not-list", "/generate", tgi({"stop": "abc"}), 422, "stop"),
    Case("stop-1000-chars", "/generate", tgi({"stop": ["x" * 1000]}), 422, "stop"),
    Case("repetition-penalty-neg", "/generate", tgi({"repetition_penalty": -1.3}), 422, "repetition_penalty"),
    Case("best-of-over-cap", "/generate", tgi({"best_of": 99}), 422, "max_n"),
    Case("beams-over-cap", "/generate", tgi({"num_beams": 99}), 422, "max_beams"),
    Case("beams-times-n-over-rows", "/generate", tgi({"num_beams": 4, "best_of": 2}), 422, "row budget"),
    Case("top-n-tokens-over-cap", "/generate", tgi({"top_n_tokens": 99}), 422, "max_top_n_tokens"),
    Case("grammar-bad-regex", "/generate", tgi({"grammar": {"type": "regex", "value": "(x"}}), 422, "regex"),
    Case("grammar-bad-schema", "/generate", tgi({"grammar": {"type": "json", "value": {"type": "frob"}}}), 422,
         "frob"),
    Case("grammar-bad-type", "/generate", tgi({"grammar": {"type": "xml", "value": "x"}}), 422, "grammar"),
    Case("logit-bias-token-out-of-vocab", "/generate", tgi({"logit_bias": {"99999": 1.0}}), 422, "vocabulary"),
    Case("best-of-stream", "/generate_stream", tgi({"best_of": 2, "do_sample": True}), 422, "best_of"),
    Case("adapter-source-hub", "/generate", tgi({"adapter_source": "hub"}), 422, "adapter_source"),
    # huge / oversized
    Case("inputs-too-many-tokens", "/generate", tgi(inputs="word " * 12000), 422, "inputs"),
    Case("body-over-cap", "/generate", tgi(inputs="x" * 70000), 413, "limit"),
    # unknown adapters and bad adapter names
    Case("unknown-adapter", "/generate", tgi({"adapter_id": "nope"}), 404, "nope"),
    Case("adapter-traversal", "/generate", tgi({"adapter_id": "../x"}), 400, "name"),
    Case("adapter-abs-path", "/generate", tgi({"adapter_id": "/etc/passwd"}), 400, "name"),
    Case("adapter-urlenc", "/generate", tgi({"adapter_id": "..%2Fx"}), 400, "name"),
    Case("adapter-129", "/generate", tgi({"adapter_id": "a" * 129}), 400, "128"),
    Case("adapter-rtl-override", "/generate", tgi({"adapter_id": "lora-a\u202e"}), 400, "name"),
    Case("adapter-fullwidth", "/generate", tgi({"adapter_id": "\uff4c\uff4f\uff52\uff41"}), 400, "name"),
    Case("adapter-emoji", "/generate", tgi({"adapter_id": "bot-\U0001f600"}), 400, "name"),
    Case("adapter-nul", "/generate", tgi({"adapter_id": "lora-a\u0000"}), 400, "name"),
    Case("header-adapter-unknown", "/generate", tgi(), 404, "nope",
         headers={**J, "X-Adapter-Id": "nope"}),
    Case("header-adapter-traversal", "/generate", tgi(), 400, "name",
         headers={**J, "X-Adapter-Id": "%2e%2e%2fetc"}),
    Case("header-body-disagree", "/generate", tgi({"adapter_id": "lora-a"}), 422, "adapter_id",
         headers={**J, "X-Adapter-Id": "ia3-a"}),
    # unicode that is not text
    Case("lone-surrogate", "/generate", '{"inputs": "abc \\ud800 def"}', 422, "inputs"),
    Case("lone-low-surrogate", "/generate_stream", '{"inputs": "\\udc00"}', 422, "inputs"),
    Case("stop-lone-surrogate", "/generate", '{"inputs": "x", "parameters": {"stop": ["\\ud83d"]}}', 422, "stop"),
    # the other generation routes
    Case("stream-unknown-adapter", "/generate_stream", tgi({"adapter_id": "nope"}), 404, "nope"),
    Case("compat-missing-inputs", "/", '{"parameters": {}}', 422, "inputs"),
    Case("compat-stream-bad-top-p", "/", tgi({"top_p": 7}, stream=True), 422, "top_p"),
    # OpenAI
    Case("oai-missing-model", "/v1/completions", '{"prompt": "x"}', 422, "model"),
    Case("oai-unknown-model", "/v1/completions", oai(model="nope"), 404, "nope"),
    Case("oai-model-traversal", "/v1/completions", oai(model="../../etc"), 400, "name"),
    Case("oai-empty-prompt-list", "/v1/completions", oai(prompt=[]), 422, "prompt"),
    Case("oai-token-prompt", "/v1/completions", oai(prompt=[1, 2, 3]), 422, "prompt"),
    Case("oai-n-over-cap", "/v1/completions", oai(n=99), 422, "max_n"),
    Case("oai-presence-3", "/v1/completions", oai(presence_penalty=3), 422, "presence_penalty"),
    Case("oai-logprobs-over-cap", "/v1/completions", oai(logprobs=99), 422, "logprobs"),
    Case("oai-bad-json-schema", "/v1/completions",
         oai(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}),
         422, "response_format"),
    Case("chat-no-messages", "/v1/chat/completions", '{"model": "lora-a", "messages": []}', 422, "messages"),
    Case("chat-bad-role", "/v1/chat/completions",
         '{"model": "lora-a", "messages": [{"role": "wizard", "content": "x"}]}', 422, "role"),
    Case("chat-tools", "/v1/chat/completions",
         '{"model": "lora-a", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}', 422, "tools"),
    Case("oai-max-tokens-0", "/v1/completions", oai(max_tokens=0), 422, "max_tokens"),
    Case("oai-temperature-3", "/v1/completions", oai(temperature=3), 422, "temperature"),
    Case("oai-logit-bias", "/v1/completions", oai(logit_bias={"5": 500.0}), 422, "logit_bias"),
    Case("oai-stream-2-prompts", "/v1/completions", oai(prompt=["a", "b"], stream=True), 422, "prompt"),
    Case("oai-stop-9", "/v1/completions", oai(stop=["s"] * 9), 422, "stop"),
    Case("oai-prompt-surrogate", "/v1/completions", '{"model": "lora-a", "prompt": "a\\ud800"}', 422, "prompt"),
    Case("oai-prompt-list-surrogate", "/v1/completions", '{"model": "lora-a", "prompt": ["ok", "\\udfff"]}', 422,
         "prompt"),
    Case("oai-stop-surrogate", "/v1/completions", '{"model": "lora-a", "prompt": "a", "stop": "\\ud800"}', 422,
         "stop"),
    Case("oai-malformed", "/v1/completions", '{"model": ', 422, "json"),
    # admin JSON
    Case("reg-malformed", "/adapters", '{"name": "x", ', 422, "json", headers={**J, **AUTH}),
    Case("reg-missing-source", "/adapters", '{"name": "x"}', 422, "source", headers={**J, **AUTH}),
    Case("reg-name-int", "/adapters", '{"name": 5, "source": "/tmp"}', 422, "name", headers={**J, **AUTH}),
    Case("reg-empty-source", "/adapters", '{"name": "x", "source": ""}', 422, "source", headers={**J, **AUTH}),
    Case("reg-unknown-key", "/adapters", '{"name": "x", "source": "/tmp", "exec": "rm"}', 422, "exec",
         headers={**J, **AUTH}),
    Case("reg-content-type", "/adapters", "name=x", 415, "content type",
         headers={"Content-Type": "text/plain", **AUTH}),
    Case("reg-multipart-no-files", "/adapters", None, 422, "files", headers=dict(AUTH)),
    # routes and methods
    Case("get-adapter-traversal", "/adapters/..%2F..%2Fetc%2Fpasswd", None, 400, "name", method="GET"),
    Case("delete-adapter-bad-name", "/adapters/%00", None, 400, "name", method="DELETE", headers=dict(AUTH)),
    Case("put-generate", "/generate", tgi(), 405, "method", method="PUT"),
    Case("unknown-route", "/no/such/route", "{}", 404, "not found"),
]


@pytest.fixture(scope="module")
def tally():
    counts = {"cases": 0, "5xx": 0}
    yield counts
    record("bad_input_cases", counts["cases"])
    record("bad_input_5xx", counts["5xx"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_4xx_naming_the_problem(http, registered, tally, case):
    kwargs = {"headers": case.headers}
    if case.id == "reg-multipart-no-files":
        kwargs["data"], kwargs["files"] = {"name": "x"}, [("other", ("a.txt", b"1"))]
    elif case.body is not None:
        kwargs["content"] = case.body
    r = http.request(case.method, case.path, **kwargs)
    tally["cases"] += 1
    tally["5xx"] += r.status_code >= 500
    assert r.status_code == case.status, r.text
    body = r.json()
    err = body["error"] if isinstance(body.get("error"), str) else (body.get("error") or {}).get("message") \
        if isinstance(body.get("error"), dict) else body.get("detail")
    assert err, body
    where = f"{err} {body.get('field') or ''} {(body.get('error') or {}).get('param') if isinstance(body.get('error'), dict) else ''}"
    assert case.needle.lower() in where.lower(), body


def test_chunked_body_over_cap_is_413_before_read(server, tally):
    """No Content-Length: the cap applies to the streamed bytes."""
    sent = {"n": 0}

    def chunks():
        for _ in range(200):  # 200 x 4 KiB = 800 KiB, far above the 64 KiB cap
            sent["n"] += 1
            yield b'{"inputs": "' if sent["n"] == 1 else b"x" * 4096

    with httpx.Client(base_url=server["url"], timeout=30) as c:
        try:
            r = c.post("/generate", content=chunks(), headers=J)
        except httpx.HTTPError:  # the server may close the connection right after its 413
            r = None
    tally["cases"] += 1
    if r is not None:
        tally["5xx"] += r.status_code >= 500
        assert r.status_code == 413, r.text


@pytest.mark.parametrize("text", [
    "nul \u0000 inside", "\u05e9\u05dc\u05d5\u05dd \u202eevil\u202c rtl", "emoji \U0001f600\U0001f469\u200d\U0001f4bb",
    "combining e\u0301\u0301\u0301\u0301 marks", "\ufeffbom and \u2028 line sep", "z\u0335\u0336\u0337" * 12,
], ids=["nul", "rtl", "emoji-zwj", "combining", "bom-linesep", "zalgo"])
def test_unusual_but_valid_text_is_served(http, registered, tally, text):
    tally["cases"] += 1
    r = gen(http, inputs=text, adapter="lora-a", max_new_tokens=4)
    tally["5xx"] += r.status_code >= 500
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["generated_text"], str)


def test_server_healthy_and_generating_after_bad_input(http, registered, tally):
    assert http.get("/health").json() == {"status": "ok"}
    assert gen(http, adapter="ia3-a").status_code == 200
    bump("bad_input_health_checks")
    assert tally["5xx"] == 0
