"""`peftserve bench --only serving` on the tiny preset: HTTP via a loopback Ray Serve app vs the in-process
engine, alternated. Structure and sanity only: the ratio is reported, never asserted against its target."""

import json
import statistics

import pytest

from loadtests.presets import get_preset

EARLIER_IDLE = {"count": 7, "bytes_each": 123.0, "rss_bytes_each": 0.0, "register_ms_each": 0.1, "traced": 7,
                "total_s": 0.01}


@pytest.fixture(scope="module")
def serving_run(tmp_path_factory):
    from loadtests.bench import run

    out, work = tmp_path_factory.mktemp("serving-out"), tmp_path_factory.mktemp("serving-work")
    preset = get_preset("tiny")
    # an earlier run's results.json in the same directory: a partial run keeps its other sections
    (out / "results.json").write_text(json.dumps({"preset": preset.to_dict(), "command": "earlier run",
                                                  "started": "2000-01-01T00:00:00+00:00", "skipped": [],
                                                  "idle_adapters": EARLIER_IDLE}))
    results = run(preset, out, work, "peftserve bench --preset tiny --only serving", ("serving",))
    return results, out, preset


def test_both_sides_ran_the_same_load_and_every_request_completed(serving_run):
    results, _, preset = serving_run
    assert results["skipped"] == []
    s = results["serving"]
    n, tokens = preset.serving_concurrency, preset.serving_new_tokens
    assert (s["concurrency"], s["new_tokens"], s["rounds_timed"]) == (n, tokens, preset.serving_rounds)
    assert s["engine_config"]["max_batch_rows"] == n  # the whole load fits one batch, on both sides
    assert s["rows"]["base"] > 0 and s["rows"]["adapter"] > 0 and s["rows"]["base"] + s["rows"]["adapter"] == n
    assert len(s["adapters"]) == 1 + 8  # the base and two adapters of each of the four kinds
    assert len(s["rounds"]) == preset.serving_rounds
    assert s["topology"] == "split" and s["server"]["topology"] == "split" and s["client"] == "aiohttp"
    combined = s["other_topologies"]["combined"]  # against the same in-process engine
    assert combined["server"]["topology"] == "combined" and len(combined["rounds"]) == preset.serving_rounds
    short = [r for t in (s, combined) for r in (t["short"]["warmup"], *t["short"]["rounds"])]
    assert s["short"]["new_tokens"] == combined["short"]["new_tokens"] == preset.serving_short_new_tokens < tokens
    for r in [s["warmup"], *s["rounds"], combined["warmup"], *combined["rounds"], *short]:
        e, h = r["engine"], r["http"]
        assert e["requests"] == h["requests"] == n
        assert e["errors"] == h["errors"] == 0, (e["first_error"], h["first_error"])
        assert h["statuses"] == {"200": n}  # every HTTP request returned 200
        # each request generated the requested tokens or stopped at EOS
        assert e["complete"] == h["complete"] == n
        assert 0 < e["tokens"] <= n * tokens and 0 < h["tokens"] <= n * tokens and e["tokens"] == h["tokens"]
        assert e["tokens_per_s"] > 0 and h["tokens_per_s"] > 0 and e["seconds"] > 0 and h["seconds"] > 0


def test_ratios_follow_from_the_per_round_figures(serving_run):
    s = serving_run[0]["serving"]
    eng = [r["engine"]["tokens"] / r["engine"]["seconds"] for r in s["rounds"]]
    http = [r["http"]["tokens"] / r["http"]["seconds"] for r in s["rounds"]]
    assert s["engine_tokens_per_s_runs"] == pytest.approx(eng)
    assert s["http_tokens_per_s_runs"] == pytest.approx(http)
    ratios = [h / e for h, e in zip(http, eng, strict=True)]
    assert [r["ratio"] for r in s["rounds"]] == pytest.approx(ratios)
    assert s["ratio_runs"] == pytest.approx(ratios)
    assert s["ratio_median"] == pytest.approx(statistics.median(ratios))
    assert s["ratio_best_of"] == pytest.approx(max(http) / max(eng))
    assert s["target"] == 0.9 and s["met"] is (s["ratio_median"] >= 0.9)  # reported, not asserted
    combined = s["other_topologies"]["combined"]
    combined_ratios = [r["http"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in combined["rounds"]]
    assert combined["ratio_median"] == pytest.approx(statistics.median(combined_ratios))
    # each HTTP round says where the CPU went: the split app has an ingress process, the combined app none
    assert all(r["http"]["cpu_s"]["ingress"] > 0 for r in s["rounds"])
    assert all("ingress" not in r["http"]["cpu_s"] for r in combined["rounds"])


def test_results_json_markdown_targets_and_plot(serving_run):
    results, out, _ = serving_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["serving"]["ratio_runs"] == pytest.approx(results["serving"]["ratio_runs"])
    # the earlier run's section was kept, and says where it came from
    assert saved["idle_adapters"] == EARLIER_IDLE
    assert saved["kept_from_earlier"]["sections"] == ["idle"]
    assert saved["kept_from_earlier"]["runs"]["idle"]["command"] == "earlier run"
    target = next(t for t in saved["targets"] if t["key"] == "serving_http_vs_engine")
    assert target["target"] == ">= 0.9" and target["status"] in ("PASS", "FAIL")
    assert target["measured"] == pytest.approx(saved["serving"]["ratio_median"])
    md = (out / "results.md").read_text()
    assert "## Serving-layer cost (HTTP through Ray Serve / in-process engine)" in md
    assert "Short requests (2 new tokens" in md and "topology `combined`: median" in md
    assert "Topology `split`: median paired ratio" in md and "Topology `combined`, against" in md and "| 1 |" in md
    assert "Sections kept from earlier runs: idle (`earlier run`" in md
    png = (out / "serving_overhead.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_summary_by_hand():
    from loadtests.serving_overhead import summarize

    rounds = [{"engine": {"tokens_per_s": 100.0}, "http": {"tokens_per_s": 80.0}, "ratio": 0.8},
              {"engine": {"tokens_per_s": 120.0}, "http": {"tokens_per_s": 114.0}, "ratio": 0.95},
              {"engine": {"tokens_per_s": 90.0}, "http": {"tokens_per_s": 81.0}, "ratio": 0.9}]
    s = summarize(rounds)
    assert s["ratio_median"] == pytest.approx(0.9) and s["met"] is True
    assert s["ratio_best_of"] == pytest.approx(114.0 / 120.0)
