"""ROUGE-L (F-measure, stemmed) as an `evaluate` metric over the `rouge_score` package; loads offline."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F1 (longest common subsequence) between predictions and references."
_KWARGS = """
Args:
    predictions (list of str): generated texts.
    references (list of str or list of list of str): one or several references per prediction;
        with several, the best-matching reference counts.
Returns:
    rougeL (float): mean F1 in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries (2004)",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        if not predictions:
            return {"rougeL": 0.0}
        total = 0.0
        for pred, refs in zip(predictions, references, strict=True):
            refs = [refs] if isinstance(refs, str) else refs
            total += max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
        return {"rougeL": total / len(predictions)}
