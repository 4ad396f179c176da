"""Train / test leakage: test rows whose normalised conversation also appears in the train split."""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Mapping

from .errors import where


class LeakageWarning(UserWarning):
    """Train and test share conversations, and ``allow_leakage=True`` let it through."""


def normalize_conversation(text: str) -> str:
    """Lower-case, whitespace collapsed to single spaces: what leakage compares."""
    return " ".join(text.lower().split())


def conversation_hash(text: str) -> str:
    return hashlib.sha1(normalize_conversation(text).encode("utf-8")).hexdigest()


def leakage_report(train, test, *, max_examples: int = 5) -> dict:
    """Test rows whose (normalised) conversation also appears in train.

    ``train``/``test`` are datasets (or mappings) with ``id``, ``conversation`` and ``domain``.
    Returns ``{"n_test_rows", "n_train_rows", "by_domain": {test domain: rows},
    "examples": [{"test_index", "test_id", "train_index", "train_id"}, ...]}``.
    """
    first_train: dict[str, int] = {}
    leaked_train_hashes: set[str] = set()
    train_hashes = [conversation_hash(c) for c in train["conversation"]]
    for i, h in enumerate(train_hashes):
        first_train.setdefault(h, i)
    train_ids, test_ids = list(train["id"]), list(test["id"])
    by_domain: Counter = Counter()
    examples = []
    n_test = 0
    for j, (conv, domain) in enumerate(zip(test["conversation"], test["domain"])):
        h = conversation_hash(conv)
        if h in first_train:
            n_test += 1
            by_domain[domain] += 1
            leaked_train_hashes.add(h)
            if len(examples) < max_examples:
                i = first_train[h]
                examples.append({"test_index": j, "test_id": test_ids[j], "train_index": i, "train_id": train_ids[i]})
    n_train = sum(1 for h in train_hashes if h in leaked_train_hashes)
    return {"n_test_rows": n_test, "n_train_rows": n_train, "by_domain": dict(sorted(by_domain.items())),
            "examples": examples}


def leakage_message(report: dict, labels: Mapping[str, str], numbers: Mapping[str, list[int]]) -> str:
    ex = report["examples"][0]
    counts = ", ".join(f"{d}={c}" for d, c in report["by_domain"].items())
    return (
        f"{where(labels['test'], numbers['test'][ex['test_index']], 'conversation')}: same conversation as "
        f"{labels['train']} row {numbers['train'][ex['train_index']]} (id {ex['train_id']!r}); "
        f"{report['n_test_rows']} test rows leak from train (by domain: {counts})"
    )


__all__ = ["LeakageWarning", "conversation_hash", "leakage_message", "leakage_report", "normalize_conversation"]
