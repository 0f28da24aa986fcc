"""Run in the AdapterHub oracle venv (tests/adapterhub/oracle_venv.py): AdapterHub 1.3.0 loads each fixture
adapter and decodes each prompt with its own `generate(num_beams=k, ...)` (batch 1), for the beam oracle of
tests/serve/test_engine_beams.py.

    python beam_generate.py JOB.json   ->   stdout: one JSON object
JOB: {"base": dir, "adapters": {label: dir}, "prompts": [[token ids], ...], "generate": {kwargs}}
Out: {label: [[generated token ids of each returned sequence] per prompt]}
"""

import json
import sys

import torch
from transformers import T5ForConditionalGeneration

import adapters  # AdapterHub (adapters 1.3.0) in the oracle venv, not the project package


def run_adapter(job: dict, directory: str) -> list:
    model = T5ForConditionalGeneration.from_pretrained(job["base"]).eval()
    adapters.init(model)
    model.set_active_adapters(model.load_adapter(directory, use_safetensors=True))
    out = []
    with torch.no_grad():
        for prompt in job["prompts"]:
            ids = torch.tensor([prompt])
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  **job["generate"])
            out.append([s[1:].tolist() for s in seqs])
    return out


def main(job_file: str) -> None:
    job = json.load(open(job_file))
    print(json.dumps({label: run_adapter(job, d) for label, d in job["adapters"].items()}))


if __name__ == "__main__":
    main(sys.argv[1])
