"""Format-only baseline: can length/template features alone separate a domain from ID-safe rows?

No model is involved: a few surface features of the rendered text, a standardised logistic
regression, stratified K-fold cross-validation on the test split. An AUROC near 0.5 means the
domain is not separable by format; > ~0.9 means the rendering leaks the label.

Two feature sets, reported separately:

* :data:`FORMAT_FEATURES` (the format-only baseline): conversation shape and template only:
  number of turns / user turns, log total / user / assistant characters, number of
  ``<tool_call>`` / ``<tool_response>`` tags, presence of the tool-list system prompt.
* :data:`CONTENT_SHAPE_FEATURES` (a separate, clearly labelled content-shape baseline):
  character statistics of the text itself (code-like character fraction, newline fraction,
  code fences, non-ASCII fraction). These follow from WHAT is said (code, Swahili), which is
  part of a domain's content, not of the rendering.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ..render import TURN_START, turn_regex

FORMAT_FEATURES = ("turns", "user_turns", "log_chars", "log_user_chars", "log_model_chars",
                   "tool_calls", "tool_responses", "system_prompt")
CONTENT_SHAPE_FEATURES = ("code_fraction", "newline_fraction", "code_fences", "non_ascii_fraction")
FEATURE_SETS = {"format": FORMAT_FEATURES, "content_shape": CONTENT_SHAPE_FEATURES}
_TURN = turn_regex()
_CODE_CHARS = set("{}()[];=<>_*&|/\\#$")
SYSTEM_PREFIX = f"{TURN_START}user\nYou can call these tools:"


def format_features(conversation: str) -> list[float]:
    """The format features of one rendered conversation, in :data:`FORMAT_FEATURES` order."""
    turns = _TURN.findall(conversation)
    user_text = "".join(t for r, t in turns if r == "user")
    model_text = "".join(t for r, t in turns if r == "model")
    return [
        float(len(turns)),
        float(sum(r == "user" for r, _ in turns)),
        math.log1p(len(conversation)),
        math.log1p(len(user_text)),
        math.log1p(len(model_text)),
        float(conversation.count("<tool_call>")),
        float(conversation.count("<tool_response>")),
        float(conversation.startswith(SYSTEM_PREFIX)),
    ]


def content_shape_features(conversation: str) -> list[float]:
    """Character statistics of one conversation, in :data:`CONTENT_SHAPE_FEATURES` order."""
    n = max(len(conversation), 1)
    return [
        sum(c in _CODE_CHARS for c in conversation) / n,
        conversation.count("\n") / n,
        float(conversation.count("```")),
        sum(ord(c) > 127 for c in conversation) / n,
    ]


_EXTRACT = {"format": format_features, "content_shape": content_shape_features}


def cv_auroc(negatives: Sequence[str], positives: Sequence[str], *, seed: int = 0, folds: int = 5,
             features: str = "format") -> float:
    """Cross-validated AUROC of a logistic regression on one feature set (positives = 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    extract = _EXTRACT[features]
    x = np.array([extract(c) for c in list(negatives) + list(positives)], dtype=np.float64)
    y = np.array([0] * len(negatives) + [1] * len(positives))
    k = min(folds, len(positives), len(negatives))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    proba = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def is_tool_row(conversation: str) -> bool:
    """Tool rows (function-calling family) start with the tool-list system prompt."""
    return conversation.startswith(SYSTEM_PREFIX)


def format_baseline(rows: Sequence[Mapping], id_domains: Sequence[str], *, seed: int = 0,
                    features: str = "format", family_matched: bool = False) -> dict[str, float]:
    """Per-domain AUROC (domain's unsafe rows vs pooled ID-safe rows) on one split's rows.
    The ``id`` key pools the ID-unsafe rows. ``family_matched``: compare each group only with
    the ID-safe rows of its own conversation family (tool rows vs chat rows, by the group's
    majority), so the tool/chat split itself, which ID train also has, is not counted."""
    safe_all = [r["conversation"] for r in rows if r["domain"] in id_domains and not r["malign"]]
    groups: dict[str, list[str]] = {"id": []}
    for r in rows:
        if not r["malign"]:
            continue
        key = "id" if r["domain"] in id_domains else r["domain"]
        groups.setdefault(key, []).append(r["conversation"])
    out = {}
    for g, pos in sorted(groups.items()):
        if len(pos) < 5:
            continue
        safe = safe_all
        if family_matched:
            tool = sum(map(is_tool_row, pos)) * 2 > len(pos)
            safe = [c for c in safe_all if is_tool_row(c) == tool]
        out[g] = round(cv_auroc(safe, pos, seed=seed, features=features), 4)
    return out


# --------------------------------------------------------------------------- ID baselines (train -> test)
# What a guard has to beat on the ID task, fitted on the ID train rows and scored on the ID test
# rows: the source prior (knows which construction a row came from, reads nothing) and TF-IDF
# (reads words). Reported pooled (``id``) and for each ID domain that has both classes.


def source_tag(row: Mapping) -> str:
    """The construction a row came from: the ``<tag>`` of its id ``<domain>-<tag>-<n>``."""
    return str(row["id"])[len(row["domain"]) + 1:].rsplit("-", 1)[0]


def source_prior_scores(train: Sequence[Mapping], test: Sequence[Mapping]) -> list[float]:
    """Each test row scored by its source's unsafe share among the train rows; a source that has
    no train row (the test-only shape controls) gets the pooled train share (no information)."""
    by_tag: dict[str, list[int]] = {}
    for r in train:
        by_tag.setdefault(source_tag(r), []).append(int(r["malign"]))
    pooled = float(np.mean([int(r["malign"]) for r in train]))
    share = {t: float(np.mean(v)) for t, v in by_tag.items()}
    return [share.get(source_tag(r), pooled) for r in test]


def tfidf_scores(train: Sequence[Mapping], test: Sequence[Mapping]) -> list[float]:
    """TF-IDF (word 1-2 grams, sublinear, min_df 2) + logistic regression on whole conversations."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50000),
                          LogisticRegression(C=4.0, max_iter=2000))
    model.fit([r["conversation"] for r in train], [int(r["malign"]) for r in train])
    return [float(s) for s in model.decision_function([r["conversation"] for r in test])]


def auroc_by_domain(rows: Sequence[Mapping], scores: Sequence[float]) -> dict[str, float]:
    """AUROC pooled over ``rows`` (key ``id``) and per domain with both classes."""
    from sklearn.metrics import roc_auc_score

    y = np.array([int(r["malign"]) for r in rows])
    s = np.asarray(scores, dtype=np.float64)
    out = {"id": round(float(roc_auc_score(y, s)), 4)}
    for dom in sorted({r["domain"] for r in rows}):
        m = np.array([r["domain"] == dom for r in rows])
        if len(set(y[m].tolist())) == 2:
            out[dom] = round(float(roc_auc_score(y[m], s[m])), 4)
    return out


ID_BASELINES = {"source_prior": source_prior_scores, "tfidf": tfidf_scores}


def id_baselines(train: Sequence[Mapping], test: Sequence[Mapping], id_domains: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{baseline: {"id": pooled AUROC, domain: AUROC, "id_sources_in_train": pooled AUROC}}`` on the
    ID test rows, fitted on the ID train rows. ``id_sources_in_train`` leaves out the test rows of a
    source no train row has (the shape controls): a source prior cannot know anything about them,
    and with the pooled share they rank below every unsafe row of a mixed source."""
    tr = [r for r in train if r["domain"] in id_domains]
    te = [r for r in test if r["domain"] in id_domains]
    seen = {source_tag(r) for r in tr}
    known = [i for i, r in enumerate(te) if source_tag(r) in seen]
    out = {}
    for name, fn in ID_BASELINES.items():
        scores = fn(tr, te)
        out[name] = {**auroc_by_domain(te, scores),
                     "id_sources_in_train": auroc_by_domain([te[i] for i in known], [scores[i] for i in known])["id"]}
    return out
