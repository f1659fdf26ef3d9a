"""ROUGE-1/2/L(sum) as an `evaluate` metric module, built on the rouge_score package.

Shipped with loraflow and loaded by path (evaluate.load("loraflow/metrics/rouge")), because
evaluate.load("rouge") fetches its script from the hub, which offline machines cannot reach.
Scores are plain means of per-row F-measures (no bootstrap sampling), so reruns give identical numbers.
"""
import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum) averaged over predictions."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    rouge_types: which scores to return (default: rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: apply the Porter stemmer before matching (default: False).
    use_aggregator: return the mean (default: True), or with False each row's F-measure (for
        paired comparisons of two models on the same rows).
Returns: a dict of rouge type -> mean F-measure in [0, 1], or -> the list of per-row F-measures.
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Lin, 2004. ROUGE.", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        rows = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references):
            scores = scorer.score(ref, pred)
            for t in rouge_types:
                rows[t].append(scores[t].fmeasure)
        if not use_aggregator:
            return rows
        n = max(len(predictions), 1)
        return {t: sum(rows[t]) / n for t in rouge_types}
