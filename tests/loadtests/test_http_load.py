"""HTTP load scenarios against a real Serve app on loopback: locust runs headless over a bounded plan,
the server's swap metrics are scraped before and after (no timing asserts)."""

import json

import pytest

from loadtests.popularity import cold_slots
from loadtests.presets import get_preset


@pytest.fixture(scope="module")
def http_results(tmp_path_factory):
    import importlib.util

    # find_spec, not import: importing locust monkey-patches the process with gevent (threads, sockets),
    # which deadlocks Ray and pytest; locust only ever runs in its own subprocess
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[dev]')")
    from loadtests.http_load import run_http

    out, work = tmp_path_factory.mktemp("http-out"), tmp_path_factory.mktemp("http-work")
    preset = get_preset("tiny").with_overrides(http_requests=10)
    return run_http(preset, out, work, "start", ("uniform", "burst"), "test"), out


def test_every_request_of_the_budget_is_served_and_summarized(http_results):
    results, out = http_results
    assert set(results["scenarios"]) == {"uniform-10", "burst-10"}
    for s in results["scenarios"].values():
        assert s["requests"] == 10 and s["errors"] == 0  # the budget, exactly, and nothing failed
        assert s["p99_s"] >= s["p50_s"] > 0 and s["client_ttft_p50_s"] > 0
        assert s["tokens"] == 10 * 2  # 2 new tokens each, streamed back
        m = s["server"]
        assert m["requests"] == 10 and m["generated_tokens"] == 20  # the server saw the same load
        assert m["swaps"]["disk_to_host"]["count"] >= 1  # first uses were cold loads
    # burst: every cold request names its own file (distinct weights), so each one is a disk load
    burst = results["scenarios"]["burst-10"]
    assert burst["cold_adapters"] == cold_slots(10) == 8
    assert burst["server"]["swaps"]["disk_to_host"]["count"] >= burst["cold_adapters"]
    # uniform over 10 adapters starts cold; its cold loads are counted by the server
    assert results["scenarios"]["uniform-10"]["server"]["misses"] > 0
    saved = json.loads((out / "http_results.json").read_text())
    assert saved["scenarios"].keys() == results["scenarios"].keys()
    assert "| uniform | 10 | 0 | 10 | 0 |" in (out / "http_results.md").read_text()
