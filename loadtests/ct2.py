"""CTranslate2, the speed anchor of `peftserve bench --only runtime`, in a virtual environment of its own.

CTranslate2's converter needs transformers 4 and its own torch; neither may enter the project's venv
(transformers 5 there). So, as with the AdapterHub oracle (tests/adapterhub/oracle_venv.py):
- `ct2_python()` builds the venv once (loadtests/side_venv.py) under $PEFTSERVE_CT2_VENV or
  ~/.cache/peftserve/ct2-venv;
- `convert(base_dir, out)` runs `ct2-transformers-converter` on the same base the engine serves;
- `Ct2Worker` runs loadtests/ct2_worker.py in that venv and talks JSON lines to it: the model is loaded once
  and the bench alternates rounds between the engine and CTranslate2 in one run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from loadtests.side_venv import ensure_venv

CT2_VERSION = "4.8.5"  # the version issue 23 measured against
PINS = (f"ctranslate2=={CT2_VERSION}", "transformers==4.57.6", "sentencepiece", "protobuf")
WORKER = Path(__file__).with_name("ct2_worker.py")


def venv_dir() -> Path:
    """Outside $PEFTSERVE_HOME (tests point that at a temporary directory): built once per machine."""
    env = os.environ.get("PEFTSERVE_CT2_VENV")
    return Path(env) if env else Path.home() / ".cache" / "peftserve" / "ct2-venv"


def ct2_python(progress=print) -> str:
    """The CTranslate2 venv's python, creating the venv first if needed (a few minutes, once)."""
    return ensure_venv(venv_dir(), PINS, progress)


def convert(base_dir: Path, out: Path) -> Path:
    """The base in CTranslate2's format, float32, cached under `out` (int8 is chosen when loading it:
    `Ct2Worker.load(..., "int8")` quantizes the weights as `--quantization int8` would).

    The converter reads the checkpoint with transformers 4. A ByT5 tokenizer saved by transformers 5 does not
    load there, so for bases with one the converter gets the weights and config beside a ByT5 tokenizer saved
    by its own transformers (the vocabulary is the bytes either way); other tokenizers are copied as they are.
    """
    done = out / "model.bin"
    if done.exists():
        return out
    python = ct2_python()
    stage = out.with_name(out.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    tokenizer_config = json.loads((base_dir / "tokenizer_config.json").read_text()) if (
        base_dir / "tokenizer_config.json").exists() else {}
    byt5 = "ByT5" in str(tokenizer_config.get("tokenizer_class", ""))
    for f in base_dir.iterdir():
        weights_or_config = f.suffix in (".safetensors", ".json") and not f.name.startswith(("tokenizer", "special",
                                                                                             "added"))
        if weights_or_config or (not byt5 and f.is_file()):
            shutil.copy(f, stage / f.name)
    if byt5:
        subprocess.run([python, "-c", "import sys; from transformers import ByT5Tokenizer; "
                        "ByT5Tokenizer().save_pretrained(sys.argv[1])", str(stage)], check=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [str(Path(python).with_name("ct2-transformers-converter")), "--model", str(stage), "--output_dir",
           str(partial), "--force"]
    subprocess.run(cmd, check=True, capture_output=True)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    shutil.rmtree(stage, ignore_errors=True)
    return out


class Ct2Worker:
    """One CTranslate2 process for a run: `load` a converted model, then `run` batches of token ids."""

    def __init__(self, threads: int) -> None:
        self.proc = subprocess.Popen([ct2_python(), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.threads = threads
        self.version = self._call({"cmd": "version"})["version"]

    def _call(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CTranslate2 worker exited (code {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"CTranslate2 worker: {reply['error']}")
        return reply

    def load(self, model_dir: Path, compute_type: str = "float32") -> None:
        self._call({"cmd": "load", "model": str(model_dir), "threads": self.threads, "compute_type": compute_type})

    def run(self, inputs: list[list[int]], new_tokens: int) -> dict:
        """Greedy, exactly `new_tokens` per row (min = max decoding length). Returns seconds and output ids."""
        return self._call({"cmd": "run", "inputs": inputs, "new_tokens": new_tokens})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
