"""`peftserve bench --preset tiny`: every section runs and writes well-formed results (no timing asserts)."""

import json

import pytest

from loadtests.report import METHOD_TARGETS, TARGETS
from serve.cli import main


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("bench-out"), tmp_path_factory.mktemp("bench-work")
    # every section but methods and serving, which test_bench_methods.py and test_serving_overhead.py run
    sections = "throughput,swap,batching,idle,combinations"
    assert main(["bench", "--preset", "tiny", "--out", str(out), "--work", str(work), "--threads", "1",
                 "--only", sections]) == 0
    return out


def test_results_are_complete_and_well_formed(bench_out):
    r = json.loads((bench_out / "results.json").read_text())
    assert r["skipped"] == []  # every section ran
    assert {"cpu", "cores", "torch", "torch_threads"} <= set(r["machine"])
    cells = r["throughput"]["cells"]
    kinds = {(c["peer"], c["kind"]) for c in cells}
    assert {("engine", k) for k in ("base", "lora", "ia3", "bitfit", "prompt", "mixed")} <= kinds
    assert {("peft mixed batch", "lora"), ("peft swap per request", "lora"),
            ("merged model per adapter", "lora"), ("hf-generate base", "base")} <= kinds
    for c in cells:
        assert c["tokens_per_s"] > 0 and c["memory_bytes"] > 0 and c["ratio_to_base"] > 0
        assert c["p99_latency_s"] >= c["p50_latency_s"] > 0
        # the bench base never emits EOS, so every peer does the same work: rows x new tokens
        assert c["tokens_per_run"] == c["rows"] * r["preset"]["new_tokens"]
    for tier in ("cold", "warm", "hot", "register_to_first_token"):
        d = r["swap"][tier]
        assert d["n"] == len(d["samples"]) > 0 and d["p99"] >= d["p50"] >= 0
    assert r["swap"]["cold"]["n"] == r["preset"]["swap_samples"]  # each first touch was a real cold load
    batching = r["batching"]
    for mode in ("continuous", "static", "classic_static", "continuous_lora"):
        b = batching[mode]
        assert b["requests"] == r["preset"]["poisson_requests"] and b["tokens_per_s"] > 0
        assert b["p99_latency_s"] >= b["p50_latency_s"] > 0
    # every mode delivers the same tokens: classic static truncates its padded rows to each request's length
    assert (batching["classic_static"]["tokens"] == batching["continuous"]["tokens"] == batching["static"]["tokens"]
            == batching["continuous_lora"]["tokens"])
    rows = r["preset"]["max_batch_rows"]
    assert batching["classic_static"]["batches"] >= -(-r["preset"]["poisson_requests"] // rows)
    assert r["idle_adapters"]["count"] == r["preset"]["idle_adapters"]
    assert 0 < r["idle_adapters"]["bytes_each"] < 1e6
    assert [t["key"] for t in r["targets"]] == [k for k, *_ in TARGETS]
    # all measured in the tiny run, but the methods, serving and decoding sections' (their own modules run them)
    measured = {t["key"]: t["status"] in ("PASS", "FAIL") for t in r["targets"]}
    own_modules = (*METHOD_TARGETS, "serving_http_vs_engine", "penalties_vs_plain", "grammar_vs_plain")
    assert measured == {k: k not in own_modules for k, *_ in TARGETS}
    assert r["decode_bytes"]["lora_bytes"] > 0 and r["decode_bytes"]["base_bytes"] > 0


def test_markdown_and_plots(bench_out):
    md = (bench_out / "results.md").read_text()
    assert "## Targets" in md and "## Throughput" in md and "## Adapter swap latency" in md
    assert "peftserve bench --preset tiny" in md
    for row in ("| engine, continuous |", "| classic static (HF generate) |", "| engine, compacting static |"):
        assert row in md
    assert "continuous / classic static batching throughput" in md
    for png in ("throughput.png", "swap_latency_cdf.png"):
        data = (bench_out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_arguments_are_refused_with_a_message(capsys):
    assert main(["bench", "--preset", "tiny", "--only", "throughput,nonsense"]) == 1
    assert "unknown sections ['nonsense']" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--distinct", "1,x"]) == 1
    assert "comma-separated integers" in capsys.readouterr().err


def test_gpu_preset_skips_cleanly_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu-xl would really run")
    assert main(["bench", "--preset", "gpu-xl", "--out", str(tmp_path / "o"), "--work", str(tmp_path)]) == 0
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_classic_static_takes_arrived_requests_in_order_up_to_the_row_limit():
    from loadtests.classic_static import next_batch

    arrivals = [0.0, 0.1, 0.2, 0.3, 5.0]
    assert next_batch([0, 1, 2, 3, 4], arrivals, 0.25, 2) == [0, 1]
    assert next_batch([2, 3, 4], arrivals, 0.25, 8) == [2]  # 3 and 4 have not arrived yet
    assert next_batch([4], arrivals, 1.0, 8) == []


def test_decode_step_bytes_by_hand_for_the_flan_t5_small_shape():
    from transformers import T5Config

    from loadtests.adapter_math import decode_step_bytes

    cfg = T5Config(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8,
                   vocab_size=32128, feed_forward_proj="gated-gelu")
    got = decode_step_bytes(cfg, distinct=32, rank=16, element_size=4)
    # per decoder layer: self q,k,v,o + cross q,o (6 x 512x384) + wi_0, wi_1, wo (3 x 512x1024); plus the head
    assert got["base_bytes"] == 4 * (8 * (6 * 512 * 384 + 3 * 512 * 1024) + 32128 * 512)
    # per row: r x (in + out) on each of those 9 linears
    assert got["lora_bytes"] == 4 * 32 * 8 * 16 * (6 * (512 + 384) + 3 * (512 + 1024))
    assert 1.0 < got["lora_over_base"] < 1.1


def test_combinations_section_reports_the_pair_ratio_and_the_ties_build(bench_out):
    c = json.loads((bench_out / "results.json").read_text())["combinations"]
    assert [cell["kind"] for cell in c["cells"]] == ["base", "lora", "lora_pair"]
    assert all(cell["tokens_per_s"] > 0 for cell in c["cells"])
    pair = c["pair_vs_single"]
    assert pair["measured"] == pytest.approx(c["cells"][2]["tokens_per_s"] / c["cells"][1]["tokens_per_s"])
    assert pair["target"] == 0.8 and isinstance(pair["met"], bool)
    ties = c["ties"]
    assert len(ties["cold_s"]) == len(ties["warm_s"]) == ties["samples"] and ties["cold_s_median"] > 0
    assert (bench_out / "combinations.png").stat().st_size > 0
    assert "Several adapters on one row" in (bench_out / "results.md").read_text()
