"""TPR at fixed FPRs (+ AUROC) as a Hugging Face ``evaluate`` metric.

Load offline with ``evaluate.load("<repo>/eval/tpr_at_fpr")``. Standalone on purpose (the
``evaluate`` loader copies this file alone), so the formula is repeated here; the reference
implementation is ``eval/metrics.py`` (``threshold_at_fpr`` / ``tpr_at_fpr`` / ``auroc``) and a
test checks that both agree.
"""
import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

_DESCRIPTION = """
True-positive rate at a fixed false-positive rate. The threshold is the (1 - fpr) quantile of the
scores of the negatives (references == 0; numpy linear interpolation); TPR is the fraction of
positives (references == 1) whose score is strictly greater. Scores: higher = more unsafe.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): scores, higher = more likely positive (unsafe).
    references (list of int): 1 = positive (unsafe), 0 = negative (safe).
    fprs (list of float, optional): false-positive rates, default [0.005, 0.01, 0.02].
Returns:
    tpr (dict): fpr (as a string, e.g. "0.01") -> TPR.
    threshold (dict): fpr -> score threshold.
    auroc (float): area under the ROC curve (ties count 1/2).
    n_negative, n_positive (int).
Examples:
    >>> m = evaluate.load("eval/tpr_at_fpr")
    >>> m.compute(predictions=[0.1, 0.2, 0.9], references=[0, 0, 1], fprs=[0.5])["tpr"]
    {'0.5': 1.0}
"""

_CITATION = "MOOD benchmark metric (TPR at fixed FPR on in-distribution safe negatives)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TprAtFpr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, fprs=(0.005, 0.01, 0.02)):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        neg = scores[labels == 0]
        pos = scores[labels == 1]
        tpr = {}
        threshold = {}
        for fpr in fprs:
            key = format(float(fpr), "g")
            # same rule as eval/metrics.py: threshold_at_fpr + strict '>'
            thr = float(np.quantile(neg, 1.0 - float(fpr))) if neg.size else float("nan")
            threshold[key] = thr
            tpr[key] = float(np.mean(pos > thr)) if pos.size and neg.size else float("nan")
        auroc = float(roc_auc_score(labels, scores)) if pos.size and neg.size else float("nan")
        return {"tpr": tpr, "threshold": threshold, "auroc": auroc, "n_negative": int(neg.size), "n_positive": int(pos.size)}
