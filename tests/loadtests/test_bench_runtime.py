"""`peftserve bench --preset tiny --only runtime`: the engine (float32, int8) against a real CTranslate2 in its own
venv (built once by loadtests/ct2.py), the adapters' ratios with their rooflines, agreement, memory and profile
(well-formed results, no timing asserts)."""

import json

import pytest

from loadtests.runtime import KIND_CELLS, TARGETS, agreement
from serve.cli import main


@pytest.fixture(scope="module")
def runtime_out(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("runtime-out"), tmp_path_factory.mktemp("runtime-work")
    assert main(["bench", "--preset", "tiny", "--out", str(out), "--work", str(work), "--only", "runtime"]) == 0
    return out


def test_runtime_section_measures_every_system_shape_and_kind(runtime_out):
    results = json.loads((runtime_out / "results.json").read_text())
    assert results["skipped"] == []
    r = json.loads((runtime_out / "runtime.json").read_text())
    assert r == results["runtime"] | {"plot": r["plot"]}
    assert r["ct2_version"] == "4.8.5"
    assert [s["shape"] for s in r["shapes"]] == ["4x12->4", "1x12->4"]
    for s in r["shapes"]:
        for system in ("engine_float32", "engine_int8", "ct2_float32", "ct2_int8"):
            assert s[f"{system}_tokens_per_s"] > 0
    assert [k["kind"] for k in r["kinds"]] == list(KIND_CELLS)
    for k in r["kinds"]:
        assert k["tokens_per_s"] > 0 and 0 < k["roofline"] <= 1 and k["adapter_step_bytes"] > 0
    assert r["lora_int8_tokens_per_s"] > 0
    assert [t["key"] for t in r["targets"]] == [key for key, *_ in TARGETS]
    assert all(t["measured"] is not None for t in r["targets"])
    # the engine and CTranslate2 run the same checkpoint: on the random bench base their float32 greedy tokens agree
    assert r["agreement"]["random_base"]["engine_vs_ct2_float32"]["prefix"] >= 0.5
    assert r["agreement"]["trained_base"]["int8_vs_float32_engine"]["rows"] == 4
    assert r["memory"]["int8_linear_weight_bytes"] < r["memory"]["float32_linear_weight_bytes"] / 3.5
    for dtype in ("float32", "int8"):
        for part in ("encoder_pass", "decode_step"):
            cats = r["profile"][dtype][part]["by_category_ms"]
            assert cats["linear GEMMs"] > 0 and r["profile"][dtype][part]["wall_ms"] > 0
    assert (runtime_out / "runtime.png").stat().st_size > 10_000


def test_agreement_counts_missing_positions_as_differences():
    assert agreement([[1, 2, 3]], [[1, 2, 3]]) == {"positions": 1.0, "prefix": 1.0, "exact": 1.0, "rows": 1}
    got = agreement([[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 4], [5, 6, 7]])
    assert got["positions"] == pytest.approx(5 / 7) and got["prefix"] == pytest.approx(3 / 7) and got["exact"] == 0
