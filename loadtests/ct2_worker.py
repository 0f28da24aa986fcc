"""CTranslate2 side of the runtime bench, run with the CTranslate2 venv's python (loadtests/ct2.py), never imported
by the project. JSON lines on stdin/stdout:

    {"cmd": "version"}                                   -> {"version": "4.8.5"}
    {"cmd": "load", "model": DIR, "threads": N, "compute_type": "float32"|"int8"} -> {"ok": true, ...}
    {"cmd": "run", "inputs": [[ids]], "new_tokens": T}   -> {"seconds": s, "outputs": [[ids]]}

Inputs and outputs are token ids of the base's own vocabulary (the converter keeps its order), so the engine and
CTranslate2 see the same ids and their outputs can be compared.
"""

import json
import sys
import time


def main() -> None:
    import ctranslate2

    translator, vocab, index = None, [], {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "version":
                reply = {"version": ctranslate2.__version__}
            elif msg["cmd"] == "load":
                translator = ctranslate2.Translator(msg["model"], device="cpu", inter_threads=1,
                                                    intra_threads=int(msg["threads"]),
                                                    compute_type=msg.get("compute_type", "float32"))
                with open(f"{msg['model']}/shared_vocabulary.json") as f:
                    vocab = json.load(f)
                index = {tok: i for i, tok in enumerate(vocab)}
                reply = {"ok": True, "compute_type": translator.compute_type}
            elif msg["cmd"] == "run":
                source = [[vocab[i] for i in ids] for ids in msg["inputs"]]
                n = int(msg["new_tokens"])
                t0 = time.perf_counter()
                out = translator.translate_batch(source, beam_size=1, min_decoding_length=n, max_decoding_length=n,
                                                 max_batch_size=len(source))
                seconds = time.perf_counter() - t0
                reply = {"seconds": seconds, "outputs": [[index[t] for t in o.hypotheses[0]] for o in out]}
            else:
                reply = {"error": f"unknown command {msg['cmd']!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the bench, which records it
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
