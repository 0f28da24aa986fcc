"""Pattern-based fine-tuning end to end: the adapter learns the verbalizer words, records its pattern, and the
server's routes fill the pattern with raw inputs and answer with the words (in process over the real Engine
and registry; and, as a soak test, through the Ray Serve app)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.app_fixtures import app_args, build

PATTERN, VERBALIZER = "Loud? {input}", {"loud": "yes", "calm": "no"}


@pytest.fixture(scope="module")
def pbft(tiny_base_dir, tmp_path_factory):
    from training.config import TrainConfig
    from training.tasks import write_task
    from training.train import train

    root = tmp_path_factory.mktemp("pbft")
    tr, ev = write_task(root / "data", "loudness", n_train=200, n_eval=40)
    cfg = TrainConfig(method="lora", recipe="pattern", pattern=PATTERN, verbalizer="loud=yes,calm=no",
                      train=str(tr), eval=str(ev), output=root / "pbft-lora", base=str(tiny_base_dir),
                      input_field="text", target_field="label", learning_rate=3e-3, batch_size=16, max_steps=60,
                      eval_every=10, stop_at_metric=1.0, patience=0, dropout=0.0, max_target_length=4,
                      target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"], eval_ood=[f"again={ev}"],
                      progress=False)
    held_out = [json.loads(line) for line in ev.read_text().splitlines()]
    return train(cfg), held_out


def test_pbft_records_its_pattern_and_scores_labels(pbft):
    result, held_out = pbft
    r = result.report
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["peftserve_input_pattern"] == {"pattern": PATTERN, "verbalizer": VERBALIZER}
    assert config["peft_type"] == "LORA"
    assert r["input_pattern"]["recorded_in_adapter"] is True
    domain = r["in_domain_metrics"]
    assert domain["metric"] == "accuracy" and domain["rows"] == len(held_out)
    assert domain["value"] >= 0.8, domain  # chance is 0.5
    assert r["ood_metrics"]["again"]["value"] == pytest.approx(domain["value"])  # the same rows, scored again


class InProcessBackend:
    """build_api's Backend over one real Engine and a real registry in this process: per request what the
    Ingress and the EngineReplica do (sync the registry, submit to the engine), minus the Ray hop."""

    def __init__(self, base_dir, root):
        from serve.app.config import AppConfig
        from serve.app.metrics import Metrics
        from serve.app.sync import RegistrySync
        from serve.engine import Engine
        from serve.registry import AdapterRegistry

        self.config = AppConfig.model_validate(app_args(base_dir, root))
        self.engine = Engine.from_config(self.config.engine)
        self.registry = AdapterRegistry(root)
        self.bound = self.registry.for_base(self.engine.base.fingerprint, self.engine.base.name)
        self.sync = RegistrySync(self.bound, self.engine)
        self.metrics, self.http_in_flight, self.api_token, self.admin_token = Metrics(), [0], None, None

    def register(self, name, path):
        from serve.app.admin_routes import make_validator

        return self.bound.register(name, path, make_validator(self.engine.base_desc, self.engine.limits))

    async def generate(self, request: dict) -> dict:
        from serve.engine import GenerationParams, GenerationRequest

        self.sync.ensure_current()
        r = await self.engine.submit(GenerationRequest(inputs=request["inputs"], adapter=request.get("adapter"),
                                                       params=GenerationParams(**request["params"])))
        return {"result": {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                           "generated_tokens": r.generated_tokens, "seed": r.seed, "tokens": []}}

    async def describe(self) -> dict:
        info = self.engine.info()
        return {"base": self.engine.base_desc, "limits": self.engine.limits,
                "info": {**info, "base_name": info.get("base")}}

    async def adapters(self):
        return self.bound


def check_served(http, result, held_out):
    """GET /adapters shows the pattern; raw inputs come back as verbalizer words that classify the held-out rows
    well above chance (as in training), the base does not say the words, and apply_pattern=false turns it off."""
    listed = {a["name"]: a for a in http.get("/adapters").json()["adapters"]}
    assert listed["loud-pbft"]["spec"]["input_pattern"] == {"pattern": PATTERN, "verbalizer": VERBALIZER}
    raw = [row["text"] for row in held_out]

    def complete(model, prompts, **extra):
        reply = http.post("/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 4,
                                                   "temperature": 0, **extra})
        assert reply.status_code == 200, reply.text
        return [c["text"].strip() for c in reply.json()["choices"]]

    served = complete("loud-pbft", raw)
    words = set(VERBALIZER.values())
    assert sum(s in words for s in served) >= 0.95 * len(raw), served
    accuracy = sum(s == VERBALIZER[row["label"]] for s, row in zip(served, held_out, strict=True)) / len(raw)
    assert accuracy >= 0.8 and accuracy == pytest.approx(result.report["in_domain_metrics"]["value"], abs=0.03)
    base = complete("base", raw)
    assert sum(b in words for b in base) < 0.5 * len(raw), base  # the words come from the adapter
    # the server fills the pattern (the engine sees the longer, patterned input); the patterned text with
    # apply_pattern=false is the same request, the raw text with it switched off reaches the engine raw
    patterned = [PATTERN.replace("{input}", t) for t in raw[:8]]
    assert complete("loud-pbft", patterned, apply_pattern=False) == served[:8]

    def tgi(inputs, **extra):
        reply = http.post("/generate", json={"inputs": inputs, "parameters": {
            "adapter_id": "loud-pbft", "max_new_tokens": 4, "details": True, **extra}})
        assert reply.status_code == 200, reply.text
        return reply.json()["generated_text"].strip(), reply.json()["details"]["prompt_tokens"]

    automatic, switched_off, prepatterned = tgi(raw[0]), tgi(raw[0], apply_pattern=False), tgi(
        patterned[0], apply_pattern=False)
    assert automatic == prepatterned and automatic[0] == served[0]
    assert switched_off[1] == automatic[1] - (len(PATTERN) - len("{input}"))  # ByT5: one token per byte


def test_pbft_adapter_is_served_with_its_pattern(pbft, tiny_base_dir, tmp_path):
    from fastapi.testclient import TestClient

    from serve.app.routes import build_api

    result, held_out = pbft
    backend = InProcessBackend(tiny_base_dir, tmp_path / "registry")
    try:
        record = backend.register("loud-pbft", result.output)  # the trained directory, unchanged
        assert record.kind == "lora"
        with TestClient(build_api(backend)) as http:
            check_served(http, result, held_out)
    finally:
        backend.engine.close()


def test_a_bad_recorded_pattern_is_refused_at_registration(pbft, tiny_base, tmp_path):
    import shutil

    from adapters import AdapterError, BaseDescription, inspect_adapter

    result, _ = pbft
    bad = shutil.copytree(result.output, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["peftserve_input_pattern"]["pattern"] = "no placeholder"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    base = BaseDescription.from_model(tiny_base.model, tiny_base.name, tiny_base.fingerprint)
    with pytest.raises(AdapterError, match="has no {input} placeholder"):
        inspect_adapter(bad, base)


def test_peftserve_eval_scores_the_adapter_as_served(pbft, tiny_base_dir, tmp_path, capsys):
    """`peftserve eval --adapter` applies the recorded pattern and maps words back to labels (engine-served)."""
    from serve.cli import main

    result, _ = pbft
    ev = result.report["config"]["eval"]
    assert main(["eval", "--base", str(tiny_base_dir), "--adapter", str(result.output), "--eval", ev,
                 "--input-field", "text", "--target-field", "label", "--max-target-length", "4",
                 "--output", str(tmp_path / "scored"), "--quiet"]) == 0
    report = json.loads((tmp_path / "scored" / "eval_report.json").read_text())
    assert report["final_metrics"]["metric"] == "accuracy"
    assert report["final_metrics"]["value"] == pytest.approx(result.report["in_domain_metrics"]["value"], abs=0.03)
    assert report["input_pattern"]["pattern"] == PATTERN and report["trainable_params"] == 0
    assert report["adapter_trainable_params"] == result.report["trainable_params"]


@pytest.mark.soak
def test_pbft_adapter_through_the_ray_serve_app(pbft, tiny_base_dir, tmp_path):
    from serve.app import local

    result, held_out = pbft
    url = local.start(build(app_args(tiny_base_dir, tmp_path / "registry")), port=local.free_port(), num_cpus=2)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            reg = http.post("/adapters", json={"name": "loud-pbft", "source": str(result.output)})
            assert reg.status_code == 201, reg.text
            check_served(http, result, held_out)
    finally:
        local.stop()
