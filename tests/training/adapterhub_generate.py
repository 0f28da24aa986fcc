"""Run in the AdapterHub oracle venv (tests/adapterhub/oracle_venv.py): AdapterHub 1.3.0 itself loads each
adapter peftserve trained and decodes greedily with its cached `generate`, one prompt at a time (batch 1:
AdapterHub's encoder gates average over padding too), and reports its own config defaults.

    python adapterhub_generate.py JOB.json   ->   stdout: one JSON object
JOB: {"base": dir, "max_new_tokens": n, "adapters": {label: dir}, "prompts": [[token ids], ...]}
Out: {"configs": {class name: to_dict()},
      "adapters": {label: {"tokens": [[ids]], "scores": [[[logits per step]]], "missing": [...], "unexpected": [...]}}}
"""

import json
import sys

import torch
from transformers import T5ForConditionalGeneration

import adapters  # AdapterHub (adapters 1.3.0) in the oracle venv, not the project package

CONFIGS = ("SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig", "PrefixTuningConfig", "LoRAConfig", "UniPELTConfig",
           "MAMConfig")


def decode(model, prompt: list[int], max_new_tokens: int):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, 1:].tolist(), [s[0].tolist() for s in out.scores]


def run_adapter(job: dict, directory: str) -> dict:
    model = T5ForConditionalGeneration.from_pretrained(job["base"]).eval()
    adapters.init(model)
    info = {}
    name = model.load_adapter(directory, use_safetensors=True, loading_info=info)
    model.set_active_adapters(name)
    with torch.no_grad():
        decoded = [decode(model, p, job["max_new_tokens"]) for p in job["prompts"]]
    return {"tokens": [d[0] for d in decoded], "scores": [d[1] for d in decoded],
            "missing": info.get("missing_keys", []), "unexpected": info.get("unexpected_keys", [])}


def main(job_file: str) -> None:
    job = json.load(open(job_file))
    print(json.dumps({"configs": {c: getattr(adapters, c)().to_dict() for c in CONFIGS},
                      "adapters": {label: run_adapter(job, d) for label, d in job["adapters"].items()}}))


if __name__ == "__main__":
    main(sys.argv[1])
