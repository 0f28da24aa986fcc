"""`peftserve bench --only decoding` on the tiny preset: penalties / grammar / beams next to plain rows, one engine.
Structure and sanity only: the ratios are reported, never asserted against their targets."""

import json

from loadtests.presets import get_preset


def test_decoding_section_measures_every_cell_on_the_same_rows(tmp_path):
    from loadtests.bench import run
    from loadtests.decoding import BEAM_REQUESTS, BEAMS, MIN_ROUNDS, NEW_TOKENS, ROWS

    out, work = tmp_path / "out", tmp_path / "work"
    preset = get_preset("tiny").with_overrides(repeats=1)
    results = run(preset, out, work, "peftserve bench --preset tiny --only decoding", ("decoding",))
    assert results["skipped"] == []
    d = results["decoding"]
    assert set(d["cells"]) == {"plain", "penalties", "grammar", "beams"} and d["repeats"] == MIN_ROUNDS
    for name, cell in d["cells"].items():
        assert len(cell["row_tokens_per_s_runs"]) == MIN_ROUNDS and cell["row_tokens_per_s"] > 0, name
    # the bench base never emits EOS: every row runs to the end, so the cells do the same number of row-steps
    assert {c["row_steps"] for c in d["cells"].values()} == {ROWS * NEW_TOKENS}
    assert d["cells"]["beams"]["returned_tokens"] == BEAM_REQUESTS * NEW_TOKENS and BEAMS * BEAM_REQUESTS == ROWS
    for key in ("penalties_vs_plain", "grammar_vs_plain"):
        assert d[key]["measured"] > 0 and len(d[key]["ratio_runs"]) == MIN_ROUNDS
    assert d["beams_vs_greedy"]["seconds_ratio"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert {t["key"] for t in saved["targets"]} >= {"penalties_vs_plain", "grammar_vs_plain"}
    assert (out / "decoding.png").stat().st_size > 0
    assert "Decoding breadth per row" in (out / "results.md").read_text()
