"""`topology: combined`: each EngineReplica answers HTTP itself (no Ingress deployment). The same routes, replies
and errors as the split app, checked against the in-process engine on the same base and adapters, with real
clients (httpx, the lorax client's stream, the openai client), a real registry and Ray Serve on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.serve.app_fixtures import app_args, build, make_zoo

ADMIN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
KINDS = ("lora-a", "ia3-a", "bitfit-a", "prompt-a")
TEXT = "translate: hello world"


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    return make_zoo(tiny_base, tmp_path_factory.mktemp("combined-zoo"))


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    from serve.app import local

    args = app_args(tiny_base_dir, tmp_path_factory.mktemp("combined-registry"), admin_token=ADMIN,
                    topology="combined", engine={"max_new_tokens_cap": 1024})
    url = local.start(build(args), port=local.free_port(), num_cpus=4)
    yield {"url": url, "args": args}
    local.stop(grace_s=5, front="EngineReplica")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(tiny_base_dir, zoo):
    """Greedy texts of the in-process engine, the same base and adapter files: what HTTP must answer."""
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    engine = Engine.from_config(EngineConfig(**app_args(tiny_base_dir, "unused")["engine"]))
    try:
        for name in KINDS:
            engine.register_adapter(name, zoo[name])

        async def run():
            return await asyncio.gather(*(engine.submit(GenerationRequest(
                inputs=TEXT, adapter=n, params=GenerationParams(max_new_tokens=10))) for n in (None, *KINDS)))

        return {n: r.text for n, r in zip((None, *KINDS), asyncio.run(run()), strict=True)}
    finally:
        engine.close()


def gen(http, adapter=None, **params):
    params.setdefault("max_new_tokens", 10)
    if adapter:
        params["adapter_id"] = adapter
    return http.post("/generate", json={"inputs": TEXT, "parameters": params})


def test_the_app_has_no_ingress_deployment(server):
    from ray import serve as ray_serve

    deployments = set(ray_serve.status().applications["peftserve"].deployments)
    assert deployments == {"EngineReplica", "MetricsHub"}


def test_register_every_kind_and_a_mixed_burst_matches_the_in_process_engine(server, http, zoo, expected):
    assert http.post("/adapters", json={"name": "lora-a", "source": str(zoo["lora-a"])}).status_code == 401
    for name in KINDS:
        r = http.post("/adapters", json={"name": name, "source": str(zoo[name])}, headers=AUTH)
        assert r.status_code == 201, r.text
    assert {a["name"] for a in http.get("/adapters").json()["adapters"]} == set(KINDS)

    async def burst():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as c:
            names = [None, *KINDS] * 3
            rs = await asyncio.gather(*(c.post("/generate", json={"inputs": TEXT, "parameters": {
                "max_new_tokens": 10, **({"adapter_id": n} if n else {})}}) for n in names))
            return list(zip(names, rs, strict=True))

    for name, r in asyncio.run(burst()):
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == expected[name], name
        assert r.headers["x-peftserve-replica"]  # answered by an engine replica, which names itself


def test_stream_and_openai_clients(server, http, expected):
    from lorax import Client as LoraxClient
    from openai import OpenAI

    streamed = list(LoraxClient(server["url"]).generate_stream(TEXT, adapter_id="ia3-a", max_new_tokens=10))
    assert streamed[-1].generated_text == expected["ia3-a"]
    assert "".join(s.token.text for s in streamed if not s.token.special) == expected["ia3-a"]
    client = OpenAI(base_url=server["url"] + "/v1", api_key="unused")
    c = client.completions.create(model="prompt-a", prompt=TEXT, max_tokens=10, temperature=0)
    assert c.choices[0].text == expected["prompt-a"]
    chat = client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1


def test_bad_input_is_a_4xx_naming_the_field_and_the_replica_keeps_serving(http, expected):
    r = http.post("/generate", json={"inputs": TEXT, "parameters": {"max_new_tokens": 10_000}})
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]
    r = gen(http, adapter="no-such-adapter")
    assert r.status_code == 404 and "no-such-adapter" in r.json()["error"]
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert gen(http, adapter="bitfit-a").json()["generated_text"] == expected["bitfit-a"]


def test_health_info_and_metrics_come_from_the_replica(http):
    import time

    assert http.get("/health").json() == {"status": "ok"}
    info = http.get("/info").json()
    assert info["topology"] == "combined" and info["registry"]["adapters"] == len(KINDS)
    assert [r["node_id"] for r in info["replicas"]] and info["replicas"][0]["adapters"] == len(KINDS)
    gen(http, adapter="lora-a")
    time.sleep(1.2)  # the replica pushes every 0.5 s here
    text = http.get("/metrics").text
    assert re.search(r'peftserve_http_requests_total\{[^}]*replica="engine-', text)  # HTTP counted in the replica
    assert re.search(r'peftserve_requests_total\{[^}]*replica="engine-', text)
    assert 'replica="ingress-' not in text


def test_a_client_that_leaves_mid_stream_frees_its_row(server, http):
    """The route closes the replica's own stream (no Ray generator in between here): the engine cancels the row."""
    import time

    def cancelled() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
                   if line.startswith("peftserve_request_failures_total{") and 'error="cancelled"' in line)

    before = cancelled()
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        with c.stream("POST", "/generate_stream", json={"inputs": TEXT, "parameters": {
                "adapter_id": "lora-a", "max_new_tokens": 1024, "min_new_tokens": 1024}}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            assert http.get("/info").json()["queue"]["running"] == 1  # still decoding when the client leaves
    deadline = time.monotonic() + 15
    while http.get("/info").json()["queue"]["running"] != 0 or cancelled() < before + 1:
        assert time.monotonic() < deadline, "the abandoned row was not cancelled"
        time.sleep(0.3)
