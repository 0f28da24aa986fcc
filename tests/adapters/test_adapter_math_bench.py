"""The adapter-math benchmark runs end to end on the tiny preset and writes well-formed JSON + PNG."""

from __future__ import annotations

import json

from loadtests.adapter_math import run


def test_tiny_preset_writes_json_and_png(tmp_path):
    lines = []
    results = run("tiny", tmp_path, progress=lines.append, threads=1)  # tiny ops: no thread hand-offs
    data = json.loads((tmp_path / "adapter_math-tiny.json").read_text())
    assert data == json.loads(json.dumps(results))
    assert (tmp_path / "adapter_math-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["phase"] for r in data["layer"]} == {"decode", "encode"}
    for row in data["layer"]:
        assert set(row["ratio"]) == {"lora", "lora (no gather cache)", "ia3", "bitfit", "mixed"}
        assert all(v > 0 for v in row["ratio"].values())
    for key in ("decode_throughput_vs_base", "encode_throughput_vs_base"):
        assert set(data["model"][key]) == {"lora", "lora q,v", "ia3", "bitfit", "prompt", "mixed"}
    assert any("wrote" in line for line in lines)
