"""Exact-match accuracy as an `evaluate` metric, shipped with peftserve so it loads offline."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after stripping surrounding whitespace."
_KWARGS = """
Args:
    predictions (list of str): generated texts.
    references (list of str): gold texts.
    ignore_case (bool): compare case-insensitively (default False).
Returns:
    exact_match (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False):
        def norm(s):
            s = s.strip()
            return s.lower() if ignore_case else s

        if not predictions:
            return {"exact_match": 0.0}
        hits = sum(norm(p) == norm(r) for p, r in zip(predictions, references, strict=True))
        return {"exact_match": hits / len(predictions)}
