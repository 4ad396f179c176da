"""Evaluation, by job: :mod:`eval.engine` (detectors, the detector table, the forward planner,
forward passes, fusion, metrics), :mod:`eval.run` (the context resolved once from a recipe, fit,
evaluate, bundles, streamed scoring) and :mod:`eval.report` (run folders, charts, report,
compare; no torch).

Public API (imported lazily so ``import eval`` stays light; the recipe-taking functions are entry
points: they resolve the recipe once, :func:`eval.run.context.resolve`)::

    from eval import fit_detectors, evaluate_recipe, export_bundle, Monitor
    fit_detectors(recipe)                       # <run>/stats/ (cached)
    folders = evaluate_recipe(recipe, ["guard+maha"])   # {monitor: <run>/eval/<monitor>/}
    export_bundle(recipe, "bundle/", "guard+maha")
    Monitor.load("bundle/").score(["<start_of_turn>user\\nhi<end_of_turn>"])
    score_stream(Monitor.load("bundle/"), scan_input("in.jsonl"), "out.jsonl")  # chunked, resumable
    res = refresh(RefreshRequest(source="bundle/", data="new.jsonl", out="r1/"))  # docs/refresh.md
    res.promoted, res.reason, res.bundle        # exit_code 0 promoted / 3 held back; read_lineage(res.bundle)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "fit_detectors": "eval.run.fitting", "evaluate_recipe": "eval.run.evaluate", "export_bundle": "eval.run.bundle",
    "resolve": "eval.run.context", "Monitor": "eval.run.bundle", "score_stream": "eval.run.streaming",
    "scan_input": "eval.run.streaming", "analyze": "eval.engine.metrics", "tpr_at_fpr": "eval.engine.metrics",
    "DETECTORS": "eval.engine.table", "parse_monitor": "eval.engine.table", "parse_monitors": "eval.engine.table",
    "refresh": "eval.run.refresh", "RefreshRequest": "eval.run.refresh", "read_lineage": "eval.run.lineage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
