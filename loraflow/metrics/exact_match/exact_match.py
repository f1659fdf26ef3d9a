"""Exact-match accuracy as an `evaluate` metric module, loaded by path like loraflow's ROUGE.

Both sides are normalized first (case, surrounding whitespace and quotes, trailing . ! ?), so
"Paris." matches "paris" but "Paris is the capital" does not.
"""
import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    use_aggregator: return the share (default: True), or with False each row's 1.0 or 0.0.
Returns: {"exact_match": share of rows whose normalized prediction equals the normalized reference},
or {"exact_match": [1.0 or 0.0 per row]}.
"""


def normalize(text: str) -> str:
    return text.strip().strip("\"'`").strip().rstrip(".!?").strip().casefold()


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference after light normalization.",
            citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, use_aggregator=True):
        hits = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]
        if not use_aggregator:
            return {"exact_match": hits}
        return {"exact_match": sum(hits) / max(len(predictions), 1)}
