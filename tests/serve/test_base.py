import json

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from serve.cli import main
from serve.engine.base import PRESETS, BaseLoadError, build_base, fingerprint, load_base, t5_config


def test_embedded_base_has_flan_t5_architecture(tiny_base):
    model = tiny_base.model
    cfg = model.config
    assert cfg.is_gated_act and cfg.feed_forward_proj == "gated-gelu"
    assert cfg.relative_attention_num_buckets == 32
    assert cfg.scale_decoder_outputs is False  # FLAN-T5 (T5 v1.1) does not rescale decoder outputs
    # untied head: its own storage, not the embeddings' (transformers 5 forces tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    # the input embeddings stay shared between encoder and decoder, as in FLAN-T5
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000


def test_reload_with_plain_transformers_is_identical(tiny_base_dir, tiny_base):
    model = T5ForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert json.loads((tiny_base_dir / "config.json").read_text())["tie_word_embeddings"] is False
    ids = tok(["translate: hello", "x"], return_tensors="pt", padding=True)
    dec = torch.zeros((2, 3), dtype=torch.long)
    a = model(**ids, decoder_input_ids=dec).logits
    b = tiny_base.model(**ids, decoder_input_ids=dec).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert fingerprint(model) == tiny_base.fingerprint


def test_build_is_deterministic(tmp_path, tiny_base):
    path = build_base(tmp_path / "again", "tiny")
    assert load_base(str(path)).fingerprint == tiny_base.fingerprint
    assert build_base(tmp_path / "seed1", "tiny", seed=1) and \
        load_base(str(tmp_path / "seed1")).fingerprint != tiny_base.fingerprint


def test_flan_t5_small_preset_shape():
    cfg = t5_config("flan-t5-small")
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads, cfg.vocab_size) == \
        (512, 1024, 8, 8, 6, 32128)
    assert set(PRESETS) >= {"tiny", "flan-t5-small", "flan-t5-xl"}


def test_bad_base_paths_are_one_line_errors(tmp_path):
    with pytest.raises(BaseLoadError, match="does not exist"):
        load_base(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(BaseLoadError, match="is not a directory"):
        load_base(str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseLoadError, match="missing config.json"):
        load_base(str(tmp_path / "empty"))


def test_check_base_source_without_loading_weights(tmp_path, tiny_base_dir):
    import json
    import shutil

    from serve.engine import check_base_source

    check_base_source(None)
    check_base_source(str(tiny_base_dir))
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_base_dir, no_tok)
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "spiece")):
            f.unlink()
    with pytest.raises(BaseLoadError, match="a tokenizer"):
        check_base_source(str(no_tok))
    bart = tmp_path / "bart"
    shutil.copytree(tiny_base_dir, bart)
    cfg = json.loads((bart / "config.json").read_text())
    (bart / "config.json").write_text(json.dumps({**cfg, "model_type": "bart"}))
    with pytest.raises(BaseLoadError, match="model_type 'bart'"):
        check_base_source(str(bart))
    (bart / "config.json").write_text("{not json")
    with pytest.raises(BaseLoadError, match="not readable JSON"):
        check_base_source(str(bart))
    with pytest.raises(BaseLoadError, match="neither an existing local directory nor a hub id"):
        check_base_source("no such/model here")


def test_unreachable_hub_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseLoadError, match="embedded base"):
        load_base("google/flan-t5-xl-does-not-exist-here")


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["base", "build", "--no-such-flag"])
    assert e.value.code == 2


def test_cli_bad_base_path_no_traceback(tmp_path, capsys):
    rc = main(["base", "info", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "missing config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "register", "train", "base", "bench"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: peftserve " + command in capsys.readouterr().out
