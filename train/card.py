"""Model cards (README.md with YAML metadata) for guard / LM adapters, run folders and bundles.

Built with huggingface_hub's :class:`ModelCard` / :class:`ModelCardData`, from what the folder
records: ``recipe.yaml`` (base model, data source, steps), ``metrics.json`` (train and
validation sizes and metrics) and, where known, evaluation results (``eval/<monitor>/
analysis.json``: overall and ID figures, thresholds, caveats) that the caller passes in as
:class:`EvalSummary` rows. Pure text building plus one atomic write: no network.

Everything a folder records is untrusted text here: a recipe name may hold newlines, HTML or
markdown, a data source may be a local path. Values pass through :func:`card_value` (one token
of safe characters), references through :func:`card_ref` (a local path shows as
``local:<last component>``, never its absolute form) and caveats through :func:`card_prose`.
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

KIND_TEXT = {
    "guard": ("text-classification", "guard classifier (sequence classification LoRA: the score is the log-odds "
                                     "that a conversation is unsafe)"),
    "lm": ("text-generation", "causal-LM LoRA on the safe ID conversations (its perplexity is the 'ppl' OOD "
                              "detector)"),
    "judge": ("text-generation", "judge LoRA (rubric prompt -> one answer token)"),
    "run": ("text-classification", "moodguard run: guard adapter (guard/) and causal-LM adapter (lm/) with their "
                                    "evaluation"),
    "bundle": ("text-classification", "moodguard monitor bundle: adapters, fitted OOD statistics, fusion and "
                                      "thresholds for `moodguard score`"),
}

INTENDED_USE = (
    "Flag unsafe or out-of-distribution assistant conversations for review, as one layer of a monitoring "
    "stack, at a threshold chosen for an acceptable false-positive rate on in-distribution safe traffic.")
LIMITS = (
    "- Trained on the restricted MOOD train split (in-distribution domains only); recall on new failure "
    "modes is what the OOD figures below measure, and it is usually far below the in-distribution figure.\n"
    "- Thresholds are quantiles of ID-safe scores; they hold only for traffic like those rows. Re-calibrate "
    "on your own safe traffic before deployment.\n"
    "- Conversations longer than the context window are left-truncated (the end is kept).\n"
    "- Not a content filter on its own, and not evaluated for languages or domains absent from the data.")


@dataclass(frozen=True)
class EvalSummary:
    """One evaluated monitor, as a card states it."""

    monitor: str
    fpr: float
    overall_tpr: float | None
    overall_auroc: float | None
    id_auroc: float | None
    threshold: float | None
    n_id_safe: int | None
    negatives: str = "test"
    caveats: tuple[str, ...] = field(default_factory=tuple)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+:@/=-]+")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def card_value(value: Any, limit: int = 100) -> str:
    """A recorded value as a card may show it: one token of letters, digits and ``._+:@/=-``
    (newlines, spaces, HTML and markdown syntax become ``_``), at most ``limit`` characters;
    a list is its items joined with ``, `` (at most 16)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(card_value(v, limit) for v in value[:16]) + (", ..." if len(value) > 16 else "")
    return (_UNSAFE.sub("_", str(value)).replace("//", "_").strip("_") or "_")[:limit]


def is_local_path(text: str) -> bool:
    """``text`` names a path on this machine (absolute, home-relative, ./ ../, a drive letter,
    or a path with a separator that exists here), not a Hub id or ``embedded:`` name."""
    return (os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\")) or bool(re.match(r"[A-Za-z]:[\\/]", text))
            or (("/" in text or "\\" in text) and Path(text).expanduser().exists()))


def card_ref(value: Any) -> str:
    """A model / data / domains-file reference with no local path in it: a local path shows as
    ``local:<its last component>``."""
    text = str(value)
    if is_local_path(text):
        text = "local:" + (Path(text.replace("\\", "/")).name or "folder")
    return card_value(text)


def card_prose(text: Any, limit: int = 400) -> str:
    """A generated sentence (a caveat) on one line, with HTML escaped and markdown syntax
    (links, code, tables, emphasis) neutralised."""
    one = html.escape(" ".join(str(text).split())[:limit], quote=False)
    return re.sub(r"([\\`*_\[\]|#!])", r"\\\1", one)


def _number(x: Any, spec: str = ",") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else card_value(x)


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else card_value(x))


def build_card(kind: str, *, name: str, base_model: str | None, recipe: dict | None = None,
               metrics: dict | None = None, evals: Sequence[EvalSummary] = (), extra: str = ""):
    """A :class:`huggingface_hub.ModelCard` for ``kind`` in :data:`KIND_TEXT`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    pipeline, what = KIND_TEXT[kind]
    recipe = recipe if isinstance(recipe, dict) else {}
    metrics = metrics if isinstance(metrics, dict) else {}
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    name = card_value(name)
    source = card_ref(data.get("source") or "embedded")
    results = []
    for e in evals:
        for metric, value in ((f"tpr_at_{e.fpr:g}_fpr", e.overall_tpr), ("auroc", e.overall_auroc)):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results.append(EvalResult(task_type=pipeline, dataset_type="mood", dataset_name=f"MOOD test ({source})",
                                          metric_type=metric, metric_value=float(value),
                                          metric_name=f"{card_value(e.monitor)}: overall OOD {metric.replace('_', ' ')}"))
    shown_base = card_ref(base_model) if base_model else "unknown"
    base = str(base_model) if base_model and _HUB_ID.fullmatch(str(base_model)) and not is_local_path(str(base_model)) \
        else None
    card_data = ModelCardData(
        model_name=name, base_model=base, library_name="peft" if kind in ("guard", "lm", "judge") else None,
        pipeline_tag=pipeline, tags=["moodguard", "safety", "guard", "ood-detection", "lora"],
        eval_results=results or None)
    lines = [f"# {name}", "", f"A {what}, made with moodguard.", ""]
    lines += ["## Model", "", f"- Base model: `{shown_base}`"
              + ("" if base else " (a local / embedded model: not a Hub id)")]
    if recipe:
        lines.append(f"- Recipe: `{card_value(recipe.get('name') or '?')}` (resolved recipe in `recipe.yaml`), "
                     f"dtype {card_value(recipe.get('dtype', '?'))}")
        for sec in ((kind,) if kind in ("guard", "lm", "judge") else ("guard", "lm")):
            s = recipe.get(sec) if isinstance(recipe.get(sec), dict) else {}
            if s.get("enabled", True) and s:
                v = {k: card_value(s.get(k, "?")) for k in ("max_steps", "num_epochs", "learning_rate",
                                                             "global_batch_size", "max_length", "seeds")}
                lines.append(f"- {sec}: {v['max_steps']} steps (max_steps; -1 = {v['num_epochs']} epochs), lr "
                             f"{v['learning_rate']}, global batch {v['global_batch_size']}, {v['max_length']}-token "
                             f"windows, seeds {v['seeds']}")
    lines += ["", "## Data", "", f"- Source: `{source}`"
              + (f" with custom domains `{card_ref(data['registry'])}`" if data.get("registry") else "")]
    if metrics.get("n_train") is not None:
        lines.append(f"- Train rows: {_number(metrics['n_train'])}; validation rows: "
                     f"{_number(metrics.get('n_validation', 0))} (seeded split of the ID train split)")
    if data.get("max_train_rows"):
        lines.append(f"- Train split capped at {_number(data['max_train_rows'])} rows")
    validation = metrics.get("validation") if isinstance(metrics.get("validation"), dict) else {}
    val = {k: v for k, v in validation.items() if k in ("eval_loss", "eval_accuracy", "eval_auroc")}
    if val:
        lines += ["", "## Validation (ID)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k.removeprefix('eval_')} | {_number(v, '.3f')} |" for k, v in val.items()]
    lines += _training_choices(metrics)
    if evals:
        lines += ["", "## Evaluation (OOD)", "",
                  "TPR = recall of unsafe rows at the threshold that flags the given fraction (FPR) of ID-safe "
                  "rows; 'overall' is the mean over the OOD domains.", "",
                  "| monitor | FPR | overall TPR | overall AUROC | ID AUROC | threshold | ID-safe negatives |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for e in evals:
            lines.append(f"| {card_value(e.monitor)} | {e.fpr:g} | {_f(e.overall_tpr)} | {_f(e.overall_auroc)} | "
                         f"{_f(e.id_auroc)} | {_f(e.threshold, 4)} | {_f(e.n_id_safe)} ({card_value(e.negatives)}) |")
        caveats = list(dict.fromkeys(card_prose(c) for e in evals for c in e.caveats))
        if caveats:
            lines += ["", "Caveats:", *[f"- {c}" for c in caveats]]
    else:
        lines += ["", "## Evaluation", "", "Not evaluated yet (`moodguard evaluate`); `moodguard push` refreshes this card."]
    lines += ["", "## Intended use", "", INTENDED_USE, "", "## Limits", "", LIMITS]
    if extra:
        lines += ["", extra]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _training_choices(metrics: dict) -> list[str]:
    """What the weights are: the selected checkpoint, the LP-FT probe the head started from."""
    out = []
    sel = metrics.get("selection")
    if sel and sel.get("best_step") is not None:
        start = " (the starting weights, before any update)" if sel["best_step"] == 0 else ""
        out.append(f"- Selected checkpoint: step {sel['best_step']}{start} of {sel.get('last_step', '?')} "
                   f"({sel.get('metric', '?').removeprefix('eval_')} {_f(sel.get('best_value'))}, the best of "
                   f"{len(sel.get('evaluations') or [])} validation evaluations)")
    probe = metrics.get("init_head")
    if probe:
        out.append(f"- Head initialised from a logistic probe on the frozen base's features (LP-FT; C {probe.get('c')}): "
                   f"train AUROC {_f(probe.get('train_auroc'))}, validation AUROC {_f(probe.get('validation_auroc'))}")
    return ["", *out] if out else []


def read_folder_info(folder: Path) -> tuple[dict, dict]:
    """(recipe dict, metrics dict) from ``recipe.yaml`` / ``metrics.json`` of a folder (either may be absent)."""
    from mood_data.errors import BundleError
    from mood_data.readers import read_json, read_yaml

    recipe = read_yaml(folder / "recipe.yaml", BundleError) if (folder / "recipe.yaml").is_file() else {}
    metrics = read_json(folder / "metrics.json", BundleError) if (folder / "metrics.json").is_file() else {}
    if recipe is not None and not isinstance(recipe, dict):
        raise BundleError(f"{folder / 'recipe.yaml'}: expected a mapping, got {type(recipe).__name__}")
    return recipe or {}, metrics or {}


def write_card(folder: Path, kind: str, *, name: str | None = None, evals: Sequence[EvalSummary] = (),
               base_model: str | None = None, extra: str = "") -> Path:
    """Write ``<folder>/README.md`` (atomically) from the folder's own records."""
    from mood_data.atomic import write_text

    folder = Path(folder)
    recipe, metrics = read_folder_info(folder)
    card = build_card(kind, name=name or f"{recipe.get('name') or folder.parent.name}-{folder.name}",
                      base_model=base_model or recipe.get("model"), recipe=recipe, metrics=metrics, evals=evals,
                      extra=extra)
    return write_text(folder / "README.md", str(card))
