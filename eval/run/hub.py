"""Hub-ready outputs: model cards filled from a run's evaluation, and ``moodguard push``.

``push(path, repo_id)`` uploads a run root, one adapter folder or a monitor bundle with
``huggingface_hub`` (``HfApi.create_repo`` + ``HfApi.upload_folder``) after writing its model
card (:mod:`train.card`). What is uploaded is decided by :func:`upload_patterns`: adapters,
recipes, metrics, eval summaries and cards, never checkpoints, cached statistics of a run,
or ``results.jsonl`` (it holds the test conversations). Nothing here reaches the network
except the ``HfApi`` calls themselves (tests pass a mock).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mood_data.errors import BundleError, MoodguardError
from mood_data.readers import read_json, short_repr
from train.card import EvalSummary, build_card, read_folder_info, write_card

from ..engine.metrics import OVERALL, value_at_fpr
from ..report.scaling import find_eval_folders

RUN_PATTERNS = (["README.md", "recipe.yaml", "guard/*", "lm/*", "judge/*", "guard-seed*/*", "lm-seed*/*",
                 "eval/*/analysis.json", "eval/*/summary.md", "eval/*/meta.json"],
                ["checkpoints/**", "stats/**", "**/results.jsonl", ".*", "**/.*"])
ADAPTER_PATTERNS = (None, ["checkpoint-*/**", ".*", "**/.*", "*.bin"])
BUNDLE_PATTERNS = (None, [".*", "**/.*"])


def folder_kind(path: Path) -> str:
    """``bundle`` (monitor.json), ``adapter`` (adapter_config.json) or ``run`` (guard/ inside)."""
    if (path / "monitor.json").is_file():
        return "bundle"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "guard" / "adapter_config.json").is_file() or any(path.glob("guard-seed*/adapter_config.json")):
        return "run"
    raise BundleError(f"{path}: not a run folder (guard/), an adapter folder (adapter_config.json) "
                      "or a monitor bundle (monitor.json)")


def eval_summaries(run_root: Path, fpr: float = 0.01, monitors: Sequence[str] | None = None) -> list[EvalSummary]:
    """One :class:`EvalSummary` per ``<run>/eval/<monitor>/`` (optionally only ``monitors``)."""
    from ..report.caveats import analysis_warnings

    if not (run_root / "eval").is_dir():
        return []
    out = []
    for f in find_eval_folders(run_root):
        if monitors is not None and f.monitor not in monitors:
            continue
        a, o = f.analysis, f.analysis.get(OVERALL) or {}
        out.append(EvalSummary(
            monitor=f.monitor, fpr=fpr, overall_tpr=value_at_fpr(o.get("tpr", {}), fpr), overall_auroc=o.get("auroc"),
            id_auroc=((a.get("groups") or {}).get("id") or {}).get("auroc"),
            threshold=value_at_fpr(a.get("thresholds", {}), fpr), n_id_safe=a.get("n_id_safe"),
            negatives=(a.get("calibration") or {}).get("split", "test"),
            caveats=tuple(w["message"] for w in analysis_warnings(a, f.meta))))
    return sorted(out, key=lambda e: (e.monitor.count("+"), e.monitor))


def _uses_lm(monitor: str) -> bool:
    """True when a detector of the monitor runs on the causal-LM adapter (the table says which)."""
    from ..engine.planner import plan
    from ..engine.table import parse_monitor

    return plan(parse_monitor(monitor)).needs_lm_adapter


def write_cards(path: str | os.PathLike, fpr: float = 0.01) -> list[Path]:
    """(Re)write the model cards of a run root (its own + each adapter's) or of one adapter
    folder, with the run's evaluation where it exists. Bundles get theirs at export."""
    path = Path(path).resolve()
    kind = folder_kind(path)
    if kind == "bundle":
        return [path / "README.md"] if (path / "README.md").is_file() else []
    if kind == "adapter":
        recipe, metrics = read_folder_info(path)
        evals = eval_summaries(path.parent, fpr)
        return [write_card(path, metrics.get("kind") or ("lm" if path.name.startswith("lm") else "guard"),
                           evals=evals if not path.name.startswith("lm") else
                           [e for e in evals if _uses_lm(e.monitor)])]
    evals = eval_summaries(path, fpr)
    written = []
    for sub in sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file()):
        written += write_cards(sub, fpr)
    recipe, _ = read_folder_info(path)
    guard = path / "guard" if (path / "guard").is_dir() else next(path.glob("guard-seed*"))
    _, metrics = read_folder_info(guard)
    from mood_data.atomic import write_text

    card = build_card("run", name=str(recipe.get("name") or path.name), base_model=recipe.get("model"),
                      recipe=recipe, metrics=metrics, evals=evals)
    written.append(write_text(path / "README.md", str(card)))
    return written


def bundle_card(bundle_dir: Path, recipe_doc: dict, analysis: dict, monitor: str, meta: dict | None = None,
                metrics: dict | None = None, fpr: float = 0.01, lineage: dict | None = None):
    """The card of a bundle being exported (written into it before its manifest); ``recipe_doc``:
    the resolved recipe as a mapping (what the bundle's recipe.yaml holds); ``lineage``: its
    lineage.json (the card shows the chain)."""
    from ..report.caveats import analysis_warnings

    o = analysis.get(OVERALL) or {}
    ev = EvalSummary(monitor=monitor, fpr=fpr, overall_tpr=value_at_fpr(o.get("tpr", {}), fpr), overall_auroc=o.get("auroc"),
                     id_auroc=((analysis.get("groups") or {}).get("id") or {}).get("auroc"),
                     threshold=value_at_fpr(analysis.get("thresholds", {}), fpr), n_id_safe=analysis.get("n_id_safe"),
                     negatives=(analysis.get("calibration") or {}).get("split", "test"),
                     caveats=tuple(w["message"] for w in analysis_warnings(analysis, meta)))
    thr = ", ".join(f"FPR {k}: {v:.4f}" for k, v in (analysis.get("thresholds") or {}).items() if v is not None)
    usage = ("## Use\n\n```\nmoodguard score --monitor <this folder> conversations.jsonl --out scores.jsonl\n```\n\n"
             f"Thresholds on the fused score (flag when strictly above): {thr}.")
    if lineage is not None:
        from .lineage import lineage_markdown

        usage += "\n\n" + lineage_markdown(lineage)
    return build_card("bundle", name=f"{recipe_doc.get('name') or bundle_dir.name}-{monitor}",
                      base_model=recipe_doc.get("model"), recipe=recipe_doc, metrics=metrics, evals=[ev], extra=usage)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    kind: str
    url: str
    files: list[str]


def upload_patterns(kind: str) -> tuple[list[str] | None, list[str]]:
    return {"run": RUN_PATTERNS, "adapter": ADAPTER_PATTERNS, "bundle": BUNDLE_PATTERNS}[kind]


def files_to_upload(path: Path, kind: str) -> list[str]:
    """The relative paths :func:`push` uploads (same filter as ``upload_folder``)."""
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = upload_patterns(kind)
    rels = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return list(filter_repo_objects(rels, allow_patterns=allow, ignore_patterns=ignore))


def check_push_arguments(repo_id: str, fpr: float) -> None:
    """What ``push`` is asked to do, checked before any card is written: a valid Hub repository
    id and an FPR in (0, 1) (``nan`` would be written into the card)."""
    import math

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(fpr, (int, float)) or isinstance(fpr, bool) or not math.isfinite(fpr) or not 0 < fpr < 1:
        raise MoodguardError(f"--fpr {fpr}: expected an FPR in (0, 1), e.g. 0.01")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise MoodguardError(f"--repo-id {short_repr(repo_id)}: not a valid Hub repository id "
                             f"({' '.join(str(exc).split())[:200]})") from None


def push(path: str | os.PathLike, repo_id: str, *, private: bool = False, api=None, token: str | None = None,
         revision: str | None = None, commit_message: str | None = None, fpr: float = 0.01) -> PushResult:
    """Write the card(s), create the repo if needed and upload the folder (one commit). A
    bundle's manifest is verified first and the verified private copy is what is uploaded; a Hub
    that cannot be reached or refuses the upload is a one-line error naming the repository."""
    check_push_arguments(repo_id, fpr)
    path = Path(path).resolve()
    if not path.is_dir():
        raise BundleError(f"{path}: folder not found")
    kind = folder_kind(path)
    if kind == "bundle":
        if not (path / "README.md").is_file():
            raise BundleError(f"{path}: bundle has no README.md model card (exported by an older moodguard: "
                              "export it again)")
        from .bundle_check import staged_bundle

        # verify the manifest while copying the bundle aside, and upload that copy: what goes to
        # the Hub is exactly what was verified (a tampered file never leaves the machine)
        with staged_bundle(path) as (staged, _):
            if not read_json(staged / "monitor.json", BundleError).get("monitor"):
                raise BundleError(f"{staged / 'monitor.json'}: field 'monitor': missing")
            return _upload(staged, kind, repo_id, private, api, token, revision,
                           commit_message or f"moodguard push: {kind} {path.name}")
    write_cards(path, fpr)
    return _upload(path, kind, repo_id, private, api, token, revision,
                   commit_message or f"moodguard push: {kind} {path.name}")


def _upload(path: Path, kind: str, repo_id: str, private: bool, api, token: str | None, revision: str | None,
            commit_message: str) -> PushResult:
    from huggingface_hub import HfApi

    files = files_to_upload(path, kind)
    if "README.md" not in files:
        raise BundleError(f"{path}: nothing to upload (no README.md among the files)")
    api = api or HfApi(token=token)
    allow, ignore = upload_patterns(kind)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model", revision=revision,
                          allow_patterns=allow, ignore_patterns=ignore, commit_message=commit_message)
    except MoodguardError:
        raise
    except Exception as exc:  # the client raises many types: HTTP errors, connection errors, offline mode
        text = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise MoodguardError(f"push {repo_id}: the Hugging Face Hub could not be reached or refused the upload "
                             f"({type(exc).__name__}: {text})") from None
    url = str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
    return PushResult(repo_id, kind, url, files)
