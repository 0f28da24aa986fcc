"""The committed AdapterHub fixtures: consistent with themselves and with transformers 5 (fast), and what
make_fixtures.py still writes (soak: builds the oracle venv on first use, minutes; then ~30 s)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
VOCAB = 384


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


def test_fixture_tree_is_complete_and_small(expected):
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 2_000_000, f"fixtures grew to {total} bytes"
    for name, a in expected["adapters"].items():
        files = {p.name for p in (FIXTURES / a["dir"]).iterdir()}
        assert {"adapter_config.json", "adapter.safetensors"} <= files, name
        assert sorted(files) == a["files"], name
        assert json.loads((FIXTURES / a["dir"] / "adapter_config.json").read_text())["name"] == name
        assert a["base"] in expected["bases"]
    pickles = [p.parent.name for p in FIXTURES.rglob("pytorch_adapter.bin")]
    assert pickles == ["prefix_tuning"]  # the convert test's input; everything else is safetensors only
    logits = load_file(str(FIXTURES / "expected_logits.safetensors"))
    assert set(logits) == {c["case"] for c in expected["cases"] if c["logits"]}
    for c in expected["cases"]:
        assert c["adapter"] is None or c["adapter"] in expected["adapters"]
        assert 1 <= c["steps"] == len(c["tokens"]) <= 6
        if c["logits"]:
            assert logits[c["case"]].shape == (c["steps"], VOCAB) and logits[c["case"]].dtype == torch.float32
            assert logits[c["case"]].argmax(-1).tolist() == c["tokens"]


@pytest.mark.parametrize("base_name", ["base_gated", "base_relu"])
def test_bases_load_with_transformers_5_and_match_the_oracle(expected, base_name):
    """The bases were written by transformers 4.57; the project's loader must give the same plain-base
    logits (untied head for base_gated, tied + d_model**-0.5 decoder scaling for base_relu)."""
    from serve.engine.base import load_base

    base = load_base(str(FIXTURES / expected["bases"][base_name]["dir"]))
    logits = load_file(str(FIXTURES / "expected_logits.safetensors"))
    cases = [c for c in expected["cases"] if c["base"] == base_name and c["adapter"] is None]
    assert len(cases) == len(expected["prompts"])
    for c in cases:
        prompt = expected["prompts"][c["prompt"]]
        assert base.tokenizer(prompt["text"]).input_ids == prompt["input_ids"]
        decoder = torch.tensor([[base.model.config.decoder_start_token_id, *c["tokens"][:-1]]])
        with torch.no_grad():
            got = base.model(input_ids=torch.tensor([prompt["input_ids"]]), decoder_input_ids=decoder).logits[0]
        assert got.argmax(-1).tolist() == c["tokens"], c["case"]
        assert (got - logits[c["case"]]).abs().max().item() < 1e-4, c["case"]


@pytest.mark.soak
def test_make_fixtures_reproduces_the_committed_tokens(tmp_path, expected):
    from tests.adapterhub.oracle_venv import oracle_python

    out = tmp_path / "fixtures"
    # Outside the repo root and without PYTHONPATH: the project's own `adapters` package must not shadow
    # AdapterHub's in the oracle venv.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([oracle_python(), str(HERE / "make_fixtures.py"), "--out", str(out)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fresh = json.loads((out / "expected.json").read_text())
    assert fresh["prompts"] == expected["prompts"]
    assert sorted(fresh["adapters"]) == sorted(expected["adapters"])
    committed = {c["case"]: c for c in expected["cases"]}
    assert sorted(c["case"] for c in fresh["cases"]) == sorted(committed)
    for c in fresh["cases"]:
        assert c["tokens"] == committed[c["case"]]["tokens"], c["case"]
    got, want = load_file(str(out / "expected_logits.safetensors")), load_file(
        str(FIXTURES / "expected_logits.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:  # bit-identical with the same torch build; a different CPU may round differently
        assert (got[key] - want[key]).abs().max().item() < 1e-5, key
