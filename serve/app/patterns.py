"""Pattern-based fine-tuning, serving side: an adapter trained on patterned inputs (`peftserve train --recipe
pattern`) records its pattern and verbalizer (adapters/pattern.py; shown as `spec.input_pattern` in
GET /adapters). Requests to it send the raw input; the pattern is filled here, the one place on the request
path, before the engine sees it. Automatic; a request that already sends the patterned text turns it off
with `parameters.apply_pattern: false` (TGI) or `"apply_pattern": false` (OpenAI completions).
"""

from __future__ import annotations


def patterned_inputs(record, texts: list[str], apply: bool) -> list[str]:
    """`texts` as the adapter was trained to read them: each filled into its recorded pattern, if it has one.
    `record` is the adapter's registry record the route already resolved (None: the base)."""
    if record is None or not apply:
        return texts
    recorded = (record.spec or {}).get("input_pattern")
    if not recorded:
        return texts
    from adapters.pattern import InputPattern  # validated at registration: building it cannot fail here

    pattern = InputPattern.from_dict(recorded)
    return [pattern.apply(t) for t in texts]
