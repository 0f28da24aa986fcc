"""`peftserve adapters convert`: AdapterHub's pytorch_adapter.bin -> adapter.safetensors, without unpickling
anything but tensors. The reference is the committed prefix-tuning fixture, whose adapter.safetensors
make_fixtures.py wrote independently (same rule: each shared tensor once, under its first key)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.adapterhub.convert import convert_adapterhub_dir, dedup_shared
from adapters.errors import AdapterNotFoundError, CorruptAdapterError, UnsupportedAdapterError
from serve.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "prefix_tuning"
CONFIG = {"config": {"architecture": "prefix_tuning", "prefix_length": 4}, "name": "x", "version": "adapters.1.3.0"}


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """The prefix-tuning fixture without its safetensors: what AdapterHub's save_adapter leaves behind."""
    d = tmp_path / "prefix_tuning"
    shutil.copytree(FIXTURE, d)
    (d / "adapter.safetensors").unlink()
    return d


def _adapter_dir(tmp_path: Path, write_weights) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(CONFIG))
    write_weights(d / "pytorch_adapter.bin")
    return d


class Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for arbitrary code in a hostile pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class Custom:
    """A class that is not on torch's weights-only allowlist."""


# ---- conversion ----------------------------------------------------------------------------------------------


def test_convert_matches_the_fixture_tensor_by_tensor(bin_dir):
    out = convert_adapterhub_dir(bin_dir)
    assert out == bin_dir / "adapter.safetensors"
    got, want = load_file(str(out)), load_file(str(FIXTURE / "adapter.safetensors"))
    assert list(got) and sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_only_aliases_are_dropped_and_the_first_key_is_kept(bin_dir):
    state = torch.load(bin_dir / "pytorch_adapter.bin", map_location="cpu", weights_only=True)
    kept = load_file(str(convert_adapterhub_dir(bin_dir)))
    first_key: dict[int, str] = {}
    for key, t in state.items():
        first_key.setdefault(t.untyped_storage().data_ptr(), key)
    # the prefix pool is reachable under every attention layer: several aliases per tensor
    assert len(kept) < len(state)
    assert set(kept) == set(first_key.values())
    for key, t in state.items():
        assert torch.equal(kept[first_key[t.untyped_storage().data_ptr()]], t), key
    assert all(".prefix_tunings." in k for k in kept)
    assert min(kept, key=list(state).index).startswith("encoder.block.0.layer.0.SelfAttention.prefix_tuning.pool.")


def test_out_dir_gets_weights_and_config_and_source_is_untouched(bin_dir, tmp_path):
    before = sorted(p.name for p in bin_dir.iterdir())
    out = convert_adapterhub_dir(bin_dir, tmp_path / "converted" / "deeper")
    assert out == tmp_path / "converted" / "deeper" / "adapter.safetensors"
    assert (out.parent / "adapter_config.json").read_bytes() == (bin_dir / "adapter_config.json").read_bytes()
    assert sorted(p.name for p in bin_dir.iterdir()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_existing_safetensors_is_replaced_whole_and_no_temp_file_is_left(bin_dir):
    (bin_dir / "adapter.safetensors").write_bytes(b"stale")
    convert_adapterhub_dir(bin_dir)
    assert load_file(str(bin_dir / "adapter.safetensors"))
    assert not [p for p in bin_dir.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_neither_target_nor_temp(bin_dir, monkeypatch):
    import adapters.adapterhub.convert as convert

    def boom(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(convert, "_save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_adapterhub_dir(bin_dir)
    assert not (bin_dir / "adapter.safetensors").exists()
    assert not [p for p in bin_dir.iterdir() if p.name.startswith(".")]


def test_dedup_keeps_distinct_views_of_one_storage_and_empty_tensors():
    base = torch.arange(8, dtype=torch.float32)
    state = {"a": base[:4], "alias": base[:4], "b": base[4:], "e1": torch.zeros(0), "e2": torch.zeros(0)}
    kept = dedup_shared(state)
    assert list(kept) == ["a", "b", "e1", "e2"]
    assert torch.equal(kept["b"], torch.arange(4, 8, dtype=torch.float32))
    ptrs = [t.untyped_storage().data_ptr() for t in kept.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # nothing shared left: safetensors accepts the dict


# ---- refused inputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_bytes(b"this is not a zip file nor a pickle " * 4),
     "weights-only loader|not a readable torch checkpoint"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes((FIXTURE / "pytorch_adapter.bin").read_bytes()[:2000]), "not a readable torch"),
    (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state dict"),
    (lambda p: torch.save({}, p), "holds no tensors"),
    (lambda p: torch.save({"w": 3}, p), "'w' is of type int, not a tensor"),
    (lambda p: torch.save({"w": {"nested": torch.zeros(2)}}, p), "'w' is of type dict"),
    (lambda p: torch.save({1: torch.zeros(2)}, p), "key 1 is of type int"),
    (lambda p: torch.save({"w": torch.zeros(2, dtype=torch.int64)}, p), "dense floating point"),
    (lambda p: torch.save({"w": Custom()}, p), "weights-only loader"),
])
def test_malformed_pickles_are_refused(tmp_path, write, match):
    d = _adapter_dir(tmp_path, write)
    with pytest.raises(CorruptAdapterError, match=match):
        convert_adapterhub_dir(d)
    assert not (d / "adapter.safetensors").exists()


@pytest.mark.parametrize("container", ["raw_pickle", "torch_zip"])
def test_code_in_a_pickle_never_runs(tmp_path, container):
    marker = tmp_path / "code-ran"
    payload = {"w": torch.zeros(2), "x": Payload(marker)}

    def write(p):
        if container == "raw_pickle":
            p.write_bytes(pickle.dumps(payload))
        else:
            torch.save(payload, p)

    d = _adapter_dir(tmp_path, write)
    assert not marker.exists()
    with pytest.raises(CorruptAdapterError, match="nothing in it was run") as err:
        convert_adapterhub_dir(d)
    assert not marker.exists()
    # torch's advice to load it unsafely (weights_only=False, allowlisting the global) is cut
    assert "False" not in str(err.value) and "safe_globals" not in str(err.value)
    if container == "torch_zip":  # a raw pickle is already refused at its first opcode (no torch magic number)
        assert "GLOBAL io.open" in str(err.value)


def test_missing_directory_weights_and_config(tmp_path):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        convert_adapterhub_dir(tmp_path / "nope")
    d = tmp_path / "a"
    d.mkdir()
    with pytest.raises(AdapterNotFoundError, match="no adapter_config.json"):
        convert_adapterhub_dir(d)
    (d / "adapter_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(AdapterNotFoundError, match="no pytorch_adapter.bin"):
        convert_adapterhub_dir(d)
    (d / "adapter.safetensors").write_bytes(b"x")
    with pytest.raises(AdapterNotFoundError, match="reads as is"):
        convert_adapterhub_dir(d)


@pytest.mark.parametrize("config, error, match", [
    ("{not json", CorruptAdapterError, "not valid JSON"),
    (json.dumps({"peft_type": "LORA", "r": 8}), UnsupportedAdapterError, "PEFT config"),
    (json.dumps(["config"]), UnsupportedAdapterError, "not AdapterHub's"),
])
def test_config_that_is_not_adapterhubs_is_refused(tmp_path, config, error, match):
    d = _adapter_dir(tmp_path, lambda p: torch.save({"w": torch.zeros(2)}, p))
    (d / "adapter_config.json").write_text(config)
    with pytest.raises(error, match=match):
        convert_adapterhub_dir(d)


# ---- CLI -----------------------------------------------------------------------------------------------------


def test_cli_converts_and_reports_path_and_count(bin_dir, tmp_path, capsys):
    assert main(["adapters", "convert", str(bin_dir), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.strip()
    n = len(load_file(str(tmp_path / "out" / "adapter.safetensors")))
    assert out == f"{tmp_path / 'out' / 'adapter.safetensors'} ({n} tensors)"


@pytest.mark.parametrize("write", [
    lambda p: p.write_bytes(pickle.dumps({"x": Custom()})),
    lambda p: torch.save({"w": 3}, p),
])
def test_cli_error_is_one_line_exit_1(tmp_path, capsys, write):
    d = _adapter_dir(tmp_path, write)
    assert main(["adapters", "convert", str(d)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftserve adapters: error: adapter weights "), captured.err
    assert "Traceback" not in captured.err and not captured.out


def test_cli_missing_dir_exit_1(tmp_path, capsys):
    assert main(["adapters", "convert", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
