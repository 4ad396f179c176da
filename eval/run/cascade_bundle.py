"""A cascade bundle (``moodguard export --cascade``) and scoring it for real (``moodguard score``).

Layout::

    <bundle>/cascade.json        name, stages [{label, monitor, folder}], the fitted rule, the fit
                                 and the evaluation figures it came with
    <bundle>/stages/<k>/         stage k's monitor bundle, as ``moodguard export`` writes it
    <bundle>/thresholds.json     the cascade score's thresholds (its eval folder's analysis.json)
    <bundle>/recipe.yaml         the resolved recipe that defined the cascade
    <bundle>/moodguard-bundle.json, manifest.json   (every file, the stages' too)

Scoring (:class:`Cascade`): stage 1 scores every conversation; each later stage scores ONLY the
rows the previous stage escalated (batched, like any monitor), so the forward passes, and the
time, follow the escalation rate. A stage whose detectors a later stage's bundle computes on the
same backbone (same base and settings, byte-identical adapter, tokenizer and statistics files)
is scored by that bundle's loaded model, and the pass it runs also gives the later stage's
detectors of that pass (``guard -> guard+maha+ppl``: the guard pass, with the pooled features
Mahalanobis reads, for every row; the LM pass only for the escalated ones): the base is loaded
once and the marginal cost is the one the evaluation measured (:mod:`eval.run.cascade`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError, MoodguardError, RecipeError
from mood_data.readers import read_json, sha256_file, short_repr
from train.recipe_schema import recipe_yaml

from ..engine.cascade import CascadeRule, passes_on, route
from ..engine.checks import check_str, fail
from ..engine.planner import first_non_finite, plan
from ..engine.table import fitted as fitted_names
from .bundle import (MANIFEST, MARKER, Monitor, UnscorableRow, check_export_out, dispose_replaced, export,
                     score_non_blank, write_manifest)
from .bundle_check import FORMAT, check_monitor_spec, check_thresholds, staged_bundle
from .cascade import CASCADE_FILE
from .context import EvalContext


# ----------------------------------------------------------------------------- export
def evaluated_cascade(ctx: EvalContext) -> tuple[Path, dict, dict]:
    """``(folder, cascade.json, analysis.json)`` of the evaluated cascade of ``ctx``, which must
    be evaluated with the recipe's current cascade settings (one-line error otherwise)."""
    spec = ctx.cascade
    folder = ctx.model.run_root / "eval" / spec.name
    if not (folder / CASCADE_FILE).is_file() or not (folder / "analysis.json").is_file():
        raise MoodguardError(f"{folder}: the cascade {spec.name!r} has not been evaluated: run `moodguard evaluate "
                             "--recipe <this recipe>` first")
    doc = read_json(folder / CASCADE_FILE, BundleError)
    fit = doc.get("fit") or {}
    now = {"stages": [st.label for st in spec.stages], "fpr": spec.fpr, "search": spec.search,
           "budget": {"max_escalation_rate": spec.max_escalation_rate,
                      "max_cost_per_conversation": spec.max_cost_per_conversation, "fill": spec.fill_budget}}
    then = {"stages": [s.get("label") for s in doc.get("stages") or []], "fpr": fit.get("fpr"),
            "search": fit.get("search"), "budget": fit.get("budget")}
    changed = [k for k in now if now[k] != then[k]]
    if changed:
        key = changed[0]
        raise MoodguardError(f"{folder / CASCADE_FILE}: field '{key}': evaluated with {short_repr(then[key])}, the "
                             f"recipe now says {short_repr(now[key])}: run `moodguard evaluate` again")
    return folder, doc, read_json(folder / "analysis.json", BundleError)


def export_cascade(ctx: EvalContext, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the bundle of the recipe's evaluated cascade: every stage's monitor bundle (each
    exported as ``moodguard export`` does), the rule and the cascade's thresholds."""
    spec = ctx.cascade
    if spec is None:
        raise RecipeError(f"{ctx.name}: the recipe has no cascade (cascade.stages is empty): nothing to export with "
                          "--cascade")
    out_dir = Path(out_dir)
    protect = (Path.cwd(), ctx.model.run_root, *(st.run_root for st in spec.stages))
    check_export_out(out_dir, overwrite, protect)  # before anything slow
    folder, doc, analysis = evaluated_cascade(ctx)
    check_export_out(out_dir, overwrite, protect)
    with atomic.atomic_dir(out_dir, dispose=dispose_replaced(out_dir)) as tmp:
        (tmp / "stages").mkdir()
        for k, st in enumerate(spec.stages, 1):
            export(st.context, tmp / "stages" / str(k))
        atomic.write_json(tmp / CASCADE_FILE, {
            "format": FORMAT, "name": spec.name,
            "stages": [{"label": st.label, "monitor": st.monitor, "folder": f"stages/{k}"}
                       for k, st in enumerate(spec.stages, 1)],
            "rule": doc["rule"], "fit": doc.get("fit"),
            "evaluation": {"folder": str(folder), **{k: (doc.get("test") or {}).get(k) for k in
                                                     ("escalation_rate", "cost_per_conversation", "overall")}},
        })
        atomic.write_json(tmp / "thresholds.json", {
            "thresholds": analysis["thresholds"], "fprs": analysis["fprs"], "n_id_safe": analysis["n_id_safe"],
            "source": f"ID-safe rows' cascade scores, {(analysis.get('calibration') or {}).get('split', 'test')} split "
                      f"({folder / 'analysis.json'})"})
        atomic.write_text(tmp / "recipe.yaml", recipe_yaml(ctx.recipe_doc))
        atomic.write_json(tmp / MARKER, {"moodguard_bundle": FORMAT})
        write_manifest(tmp)
    return out_dir


# ----------------------------------------------------------------------------- scoring
@dataclass
class Stage:
    label: str
    names: tuple[str, ...]  # its detectors
    fusion: object  # eval.engine.fusion.Fusion
    scorer: Monitor  # the loaded bundle that computes its detectors (its own, or a later stage's)


@dataclass
class Cascade:
    """A loaded cascade bundle: ``Cascade.load(dir).score(conversations) -> list[dict]``."""

    folder: Path
    name: str
    stages: list[Stage]
    rule: CascadeRule
    thresholds: dict[str, float]
    manifest_sha256: str | None = None
    rows_scored: list[int] = field(default_factory=list)  # rows each stage has scored (all calls)

    @property
    def settings(self):
        return self.stages[0].scorer.settings

    @classmethod
    def load(cls, folder: str | Path, **kwargs) -> "Cascade":
        folder = Path(folder)
        with staged_bundle(folder) as (staged, manifest):
            return cls._load_verified(staged, folder, manifest, **kwargs)

    @classmethod
    def _load_verified(cls, staged: Path, folder: Path, manifest: dict, *, base: str | None = None,
                       batch_size: int | None = None, device: str | None = None,
                       trust_remote_code: bool = False) -> "Cascade":
        from ..engine.fusion import Fusion

        path = staged / CASCADE_FILE
        doc = read_json(path, BundleError)
        shown = folder / CASCADE_FILE
        stages = doc.get("stages")
        if not isinstance(stages, list) or len(stages) < 2:
            fail(shown, "stages", f"expected a list of at least two stages, got {short_repr(stages)}")
        rule = CascadeRule.from_dict(shown, doc.get("rule"), len(stages))
        dirs, specs, names = [], [], []
        for k, st in enumerate(stages):
            if not isinstance(st, dict):
                fail(shown, f"stages[{k}]", f"expected a mapping, got {short_repr(st)}")
            check_str(shown, f"stages[{k}].label", st.get("label"))
            rel = check_str(shown, f"stages[{k}].folder", st.get("folder"))
            if rel != f"stages/{k + 1}":
                fail(shown, f"stages[{k}].folder", f"expected 'stages/{k + 1}', got {short_repr(rel)}")
            d = staged / rel
            if not (d / "monitor.json").is_file():
                fail(shown, f"stages[{k}].folder", f"{folder / rel}/monitor.json: not in the bundle")
            spec = read_json(d / "monitor.json", BundleError)
            names.append(check_monitor_spec(d, spec, trust_remote_code=trust_remote_code))
            dirs.append(d)
            specs.append(spec)
        bases = {spec["base"] for spec in specs}
        if base is not None and len(bases) > 1:
            raise BundleError(f"--base: the cascade's stages use {len(bases)} base models "
                              f"({', '.join(sorted(bases))}); --base would replace all of them")
        files = manifest.get("files") or {}
        scorers: list[Monitor | None] = [None] * len(stages)
        for k in range(len(stages) - 1, -1, -1):  # the last stage first: earlier ones may borrow its model
            host = next((m for m in range(k + 1, len(stages))
                         if _computes(files, k, names[k], specs[k], m, names[m], specs[m])), None)
            if host is not None:
                scorers[k] = scorers[host]
                continue
            scorers[k] = Monitor._load_verified(dirs[k], folder / f"stages/{k + 1}", base=base, batch_size=batch_size,
                                                device=device, trust_remote_code=trust_remote_code)
        out = []
        for k, st in enumerate(stages):
            fz = Fusion.load(dirs[k] / "fusion.json")
            if fz.detectors != list(names[k]):
                fail(folder / f"stages/{k + 1}/fusion.json", "fusion.detectors", f"{fz.detectors} != {list(names[k])}")
            out.append(Stage(st["label"], names[k], fz, scorers[k]))
        name = check_str(shown, "name", doc.get("name"))
        return cls(folder, name, out, rule, check_thresholds(staged), sha256_file(staged / MANIFEST),
                   [0] * len(out))

    def unscorable_row(self, reason: str) -> dict:
        """A conversation that cannot be scored: flagged at every FPR (fail closed), as a monitor's."""
        return {"score": None, "stage": None, "stage_scores": {s.label: None for s in self.stages}, "detectors": {},
                "flags": {k: True for k in self.thresholds}, "latency_s": 0.0, "truncated": False,
                "unscorable": reason}

    def score(self, conversations: Sequence[str]) -> list[dict]:
        """Per conversation: ``score`` (the cascade score), ``stage`` (1-based stage that decided
        it), ``stage_scores`` (each stage's monitor score, null where not reached), ``detectors``
        (the raw scores of each reached stage), ``flags`` (``score > threshold`` per FPR),
        ``latency_s``, ``truncated``, ``unscorable``. Stage k+1 runs only on the rows stage k
        escalates."""
        conversations = list(conversations)
        blank = score_non_blank(conversations, self.score, self.unscorable_row)
        if blank is not None:
            return blank
        t0 = time.perf_counter()
        n = len(conversations)
        k_stages = len(self.stages)
        raw: dict[int, dict[str, np.ndarray]] = {}  # per scorer (id): detector -> scores of every row
        cut: set[int] = set()
        stage_scores = [np.full(n, np.nan) for _ in self.stages]
        reach = np.ones(n, dtype=bool)
        for k, st in enumerate(self.stages):
            idx = np.flatnonzero(reach)
            if idx.size == 0:
                break
            have = raw.setdefault(id(st.scorer), {})
            # this stage's detectors, plus what its passes also give the later stages it serves
            later = plan(st.names).riders(d for s in self.stages[k + 1:] if s.scorer is st.scorer for d in s.names)
            want = [d for d in dict.fromkeys([*st.names, *later]) if d not in have or np.isnan(have[d][idx]).any()]
            if want:
                truncated: list[int] = []
                got = st.scorer.raw_scores([conversations[i] for i in idx], want, truncated)
                cut |= {int(idx[i]) for i in truncated}
                for d, v in got.items():
                    have.setdefault(d, np.full(n, np.nan))[idx] = v
                self.rows_scored[k] += idx.size
            part = {d: have[d][idx] for d in st.names}
            hit = first_non_finite(part)
            if hit is not None:  # fail closed: NaN > threshold is False, a silent "not flagged"
                i, det, value, n_bad = hit
                raise UnscorableRow(int(idx[i]), det, value, n_bad)
            stage_scores[k][idx] = np.asarray(st.fusion.apply(part), dtype=np.float64)
            if k < k_stages - 1:
                reach = reach & passes_on(self.rule, k, np.where(reach, stage_scores[k], 0.0))
        routed = route(self.rule, stage_scores, str(self.folder))
        per_row = (time.perf_counter() - t0) / n
        out = []
        for i in range(n):
            reached = [k for k in range(k_stages) if routed.reached[k, i]]
            out.append({
                "score": float(routed.score[i]), "stage": int(routed.stage[i]),
                "stage_scores": {s.label: float(stage_scores[k][i]) if k in reached else None
                                 for k, s in enumerate(self.stages)},
                "detectors": {self.stages[k].label: {d: float(raw[id(self.stages[k].scorer)][d][i])
                                                     for d in self.stages[k].names} for k in reached},
                "flags": {key: bool(routed.score[i] > float(t)) for key, t in self.thresholds.items()},
                "latency_s": per_row, "truncated": i in cut, "unscorable": None,
            })
        return out


def _computes(files: dict, k: int, names_k, spec_k: dict, m: int, names_m, spec_m: dict) -> bool:
    """True when stage ``m``'s bundle computes every detector of stage ``k`` exactly as stage k's
    own bundle would: same base and settings, every file stage k would load (guard adapter,
    tokenizer, the LM adapter if it needs one, its fitted statistics) byte-identical in both."""
    the_plan = plan(names_k)
    if the_plan.members or the_plan.judge or not set(names_k) <= set(names_m):
        return False
    if any(spec_k.get(key) != spec_m.get(key) for key in ("base", "dtype", "device_map", "settings",
                                                           "trust_remote_code")):
        return False
    prefixes = ["guard/", "tokenizer/", *(["lm/"] if the_plan.needs_lm_adapter else []),
                *(f"stats/{kind}-" for kind in fitted_names(names_k))]
    own = {rel[len(f"stages/{k + 1}/"):]: digest for rel, digest in files.items() if rel.startswith(f"stages/{k + 1}/")}
    needed = {rel: digest for rel, digest in own.items() if rel.startswith(tuple(prefixes))}
    return bool(needed) and all(files.get(f"stages/{m + 1}/{rel}") == digest for rel, digest in needed.items())


def load_bundle(folder: str | Path, **kwargs):
    """A monitor bundle (:class:`~eval.run.bundle.Monitor`) or a cascade bundle (:class:`Cascade`),
    by what the verified folder holds (``cascade.json``)."""
    folder = Path(folder)
    with staged_bundle(folder) as (staged, manifest):
        if (staged / CASCADE_FILE).is_file():
            return Cascade._load_verified(staged, folder, manifest, **kwargs)
        return Monitor._load_verified(staged, folder, **kwargs)


__all__ = ["Cascade", "evaluated_cascade", "export_cascade", "load_bundle"]
