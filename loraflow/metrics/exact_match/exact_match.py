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
Returns: {"exact_match": share of rows whose normalized prediction equals the normalized reference}.
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

    def _compute(self, predictions, references):
        hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / max(len(predictions), 1)}
