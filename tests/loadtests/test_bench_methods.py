"""`peftserve bench --only methods` on the tiny preset: DoRA / AdaLoRA next to LoRA, P-tuning next to prompt
tuning, one engine. Structure and sanity only: the ratios are reported, never asserted against their targets."""

import json
import statistics

import pytest

from loadtests.presets import get_preset

EARLIER_IDLE = {"count": 7, "bytes_each": 123.0, "rss_bytes_each": 0.0, "register_ms_each": 0.1, "traced": 7,
                "total_s": 0.01}


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory):
    from loadtests.bench import run

    out, work = tmp_path_factory.mktemp("methods-out"), tmp_path_factory.mktemp("methods-work")
    preset = get_preset("tiny").with_overrides(repeats=2)  # two rounds: paired ratios have two entries
    (out / "results.json").write_text(json.dumps({"preset": preset.to_dict(), "command": "earlier run",
                                                  "started": "2000-01-01T00:00:00+00:00", "skipped": [],
                                                  "idle_adapters": EARLIER_IDLE}))
    results = run(preset, out, work, "peftserve bench --preset tiny --only methods", ("methods",))
    return results, out, preset


def test_every_method_ran_on_the_same_work_through_its_serving_path(methods_run):
    results, _, preset = methods_run
    assert results["skipped"] == []
    m = results["methods"]
    n = max(preset.distinct)  # tiny has no N = 32: its largest N
    rows = max(preset.batch_rows, n)
    assert (m["distinct"], m["rows"], m["repeats"]) == (n, rows, 2)
    assert [c["kind"] for c in m["cells"]] == ["base", "lora", "dora", "adalora", "prompt", "ptuning", "prefix",
                                               "seq_bn", "unipelt"]
    served = {c["kind"]: (c["served_as"]["kind"], c["served_as"]["method"]) for c in m["cells"]}
    assert served == {"base": ("base", "base"), "lora": ("lora", "lora"), "dora": ("lora", "dora"),
                      "adalora": ("lora", "adalora"), "prompt": ("prompt", "prompt"),
                      "ptuning": ("prompt", "p_tuning"), "prefix": ("prefix", "prefix"),
                      "seq_bn": ("adapterhub", "seq_bn"), "unipelt": ("adapterhub", "unipelt")}
    assert m["device_slots"]["lora"] >= 3 * n and m["device_slots"]["prompt"] >= 2 * n  # all resident
    for c in m["cells"]:
        assert c["peer"] == "engine" and c["distinct"] == n and c["rows"] == rows
        assert c["tokens_per_s"] > 0 and all(r > 0 for r in c["tokens_per_s_runs"])
        assert len(c["tokens_per_s_runs"]) == 2 and c["tokens_per_s"] == max(c["tokens_per_s_runs"])
        assert c["tokens_per_run"] == rows * preset.new_tokens  # the bench base never stops early
        assert c["ratio_to_base"] > 0
    # one row's prefix regions: keys and values, every decoder layer, max_prefix_tokens = 20 (tiny: 4 layers x
    # 128), for the self-attention and (the adapterhub kind has slots here) the cross-attention
    assert m["prefix_tokens"] == 20 and m["kv_cache_bytes_per_prefix_row"] == 2 * (2 * 4 * 20 * 128 * 4)


def test_ratios_follow_from_the_cells(methods_run):
    m = methods_run[0]["methods"]
    by = {c["kind"]: c for c in m["cells"]}
    for kind, c in by.items():
        assert c["ratio_to_base"] == pytest.approx(c["tokens_per_s"] / by["base"]["tokens_per_s"])
        if kind != "base":
            assert m["ratios_to_base"][kind] == pytest.approx(c["ratio_to_base"])
    targets = {t["key"]: t for t in m["targets"]}
    assert list(targets) == ["ptuning_vs_prompt", "adalora_vs_lora", "dora_vs_lora", "prefix_vs_base",
                             "seq_bn_vs_base", "unipelt_vs_base"]
    for key, (a, b) in {"ptuning_vs_prompt": ("ptuning", "prompt"), "adalora_vs_lora": ("adalora", "lora"),
                        "dora_vs_lora": ("dora", "lora")}.items():
        t = targets[key]
        assert t["measured"] == pytest.approx(by[a]["tokens_per_s"] / by[b]["tokens_per_s"])
        paired = [x / y for x, y in zip(by[a]["tokens_per_s_runs"], by[b]["tokens_per_s_runs"], strict=True)]
        assert t["ratio_runs"] == pytest.approx(paired)
        assert t["ratio_median_paired"] == pytest.approx(statistics.median(paired))
    # reported, not asserted: met is what the criterion says of the measured ratio
    for key in ("ptuning_vs_prompt", "adalora_vs_lora"):
        t = targets[key]
        assert t["target"] == 1.0 and t["criterion"] == "same within ±10 %"
        assert t["met"] is (abs(t["measured"] - 1.0) <= 0.1)
    dora = targets["dora_vs_lora"]
    assert dora["target"] == 0.9 and dora["met"] is (dora["measured"] >= 0.9)
    pre = targets["prefix_vs_base"]
    assert pre["target"] == 0.85 and pre["met"] is (pre["measured"] >= 0.85)
    assert pre["measured"] == pytest.approx(by["prefix"]["tokens_per_s"] / by["base"]["tokens_per_s"])
    for key, kind, target in (("seq_bn_vs_base", "seq_bn", 0.9), ("unipelt_vs_base", "unipelt", 0.8)):
        t = targets[key]
        assert t["target"] == target and t["met"] is (t["measured"] >= target)
        assert t["measured"] == pytest.approx(by[kind]["tokens_per_s"] / by["base"]["tokens_per_s"])


def test_results_json_markdown_targets_and_plot(methods_run):
    results, out, _ = methods_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["targets"] == json.loads(json.dumps(results["methods"]["targets"]))
    assert saved["idle_adapters"] == EARLIER_IDLE  # an earlier run's section is kept
    assert saved["kept_from_earlier"]["sections"] == ["idle"]
    judged = {t["key"]: t for t in saved["targets"]}
    for t in saved["methods"]["targets"]:
        assert judged[t["key"]]["measured"] == pytest.approx(t["measured"])
        assert judged[t["key"]]["status"] == ("PASS" if t["met"] else "FAIL")
    assert judged["ptuning_vs_prompt"]["target"] == "1 ± 0.1" and judged["dora_vs_lora"]["target"] == ">= 0.9"
    md = (out / "results.md").read_text()
    assert "## PEFT and AdapterHub methods (issues 13, 14)" in md
    assert "| UniPELT | adapterhub (unipelt) |" in md and "| UniPELT / base | >= 0.8 |" in md
    assert "| DoRA | lora (dora) |" in md and "| P-tuning | prompt (p_tuning) |" in md
    assert "| DoRA / LoRA | >= 0.9 |" in md and "| AdaLoRA / LoRA | same within ±10 % |" in md
    assert "Prefix tuning: 20 virtual tokens. KV-cache bytes per prefix row" in md
    png = (out / "methods_throughput.png").read_bytes()
    assert saved["methods"]["plot"] == str(out / "methods_throughput.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_same_and_minimum_criteria_by_hand():
    from loadtests.methods import target_rows

    def cell(kind, runs):
        return {"kind": kind, "tokens_per_s": max(runs), "tokens_per_s_runs": runs}

    cells = [cell("lora", [100.0, 90.0]), cell("dora", [85.0, 88.0]), cell("adalora", [95.0, 99.0]),
             cell("prompt", [200.0, 210.0]), cell("ptuning", [240.0, 180.0])]
    t = {r["key"]: r for r in target_rows(cells)}
    assert t["adalora_vs_lora"]["measured"] == pytest.approx(0.99) and t["adalora_vs_lora"]["met"] is True
    assert t["dora_vs_lora"]["measured"] == pytest.approx(0.88) and t["dora_vs_lora"]["met"] is False
    assert t["ptuning_vs_prompt"]["measured"] == pytest.approx(240 / 210) and t["ptuning_vs_prompt"]["met"] is False
    assert t["ptuning_vs_prompt"]["ratio_median_paired"] == pytest.approx((1.2 + 180 / 210) / 2)
    assert target_rows([cell("lora", [1.0])])[0]["measured"] is None  # a missing cell: not measured
