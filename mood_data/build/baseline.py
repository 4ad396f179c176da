"""Format-only baseline: can length/template features alone separate a domain from ID-safe rows?

No model is involved: a few surface features of the rendered text, a standardised logistic
regression, stratified K-fold cross-validation on the test split. An AUROC near 0.5 means the
domain is not separable by format; > ~0.9 means the rendering leaks the label.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np

FEATURES = ("turns", "user_turns", "log_chars", "log_user_chars", "log_model_chars",
            "tool_calls", "tool_responses", "code_fraction", "newline_fraction", "code_fences")
_TURN = re.compile(r"<start_of_turn>(user|model)\n(.*?)<end_of_turn>", re.S)
_CODE_CHARS = set("{}()[];=<>_*&|/\\#$")


def format_features(conversation: str) -> list[float]:
    """The format features of one rendered conversation, in :data:`FEATURES` order."""
    turns = _TURN.findall(conversation)
    user_text = "".join(t for r, t in turns if r == "user")
    model_text = "".join(t for r, t in turns if r == "model")
    n = max(len(conversation), 1)
    return [
        float(len(turns)),
        float(sum(r == "user" for r, _ in turns)),
        math.log1p(len(conversation)),
        math.log1p(len(user_text)),
        math.log1p(len(model_text)),
        float(conversation.count("<tool_call>")),
        float(conversation.count("<tool_response>")),
        sum(c in _CODE_CHARS for c in conversation) / n,
        conversation.count("\n") / n,
        float(conversation.count("```")),
    ]


def cv_auroc(negatives: Sequence[str], positives: Sequence[str], *, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated AUROC of a logistic regression on format features (positives = 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.array([format_features(c) for c in list(negatives) + list(positives)], dtype=np.float64)
    y = np.array([0] * len(negatives) + [1] * len(positives))
    k = min(folds, len(positives), len(negatives))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    proba = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def format_baseline(rows: Sequence[Mapping], id_domains: Sequence[str], *, seed: int = 0) -> dict[str, float]:
    """Per-domain AUROC (domain's unsafe rows vs pooled ID-safe rows) on one split's rows.
    The ``id`` key pools the ID-unsafe rows."""
    safe = [r["conversation"] for r in rows if r["domain"] in id_domains and not r["malign"]]
    groups: dict[str, list[str]] = {"id": []}
    for r in rows:
        if not r["malign"]:
            continue
        key = "id" if r["domain"] in id_domains else r["domain"]
        groups.setdefault(key, []).append(r["conversation"])
    return {g: round(cv_auroc(safe, pos, seed=seed), 4) for g, pos in sorted(groups.items()) if len(pos) >= 5}
