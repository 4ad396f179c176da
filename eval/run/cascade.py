"""Evaluate a cascade monitor (the recipe's ``cascade:`` section, docs/cascade.md) from its stages'
run folders.

Every stage is a monitor already evaluated: ``<run>/eval/<monitor>/`` of this run or of another
run (another backbone). The cascade reads, per stage, ``results.jsonl`` (its score of every test
row), ``validation.json`` (its score of every ID validation row) and ``meta.json`` (the measured
seconds of each pass on the device it ran on); no model is loaded and no row is scored again.

* the bands are fitted on the ID validation rows only (:func:`eval.engine.cascade.fit_rule`), for
  the budget, with each stage's **marginal** cost: the measured seconds per conversation of the
  passes it needs that no earlier stage of the same run has run (``guard -> guard+maha+ppl`` on
  one backbone: the guard pass, which also pools the features Mahalanobis reads, then only the
  LM pass for the escalated rows; a stage of another run pays all its passes);
* the test rows are routed (:func:`eval.engine.cascade.route`): ``score`` = the cascade score of
  the stage that decided the row, ``stage`` = that stage (1-based), ``score_stage<k>`` = stage k's
  monitor score (null where the row did not reach stage k);
* ``<run>/eval/<name>/`` is a mood-bench run folder of that score (thresholds: the (1 - FPR)
  quantile of the ID-safe rows' cascade scores, as for every monitor) plus ``cascade.json``: the
  stages and their measured costs, the rule, the fit on the ID rows, and on the test rows the
  escalation rate per stage (also per domain), the cost per conversation and the recall per
  domain.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data.errors import DataError, MoodguardError
from mood_data.readers import read_json, short_repr

from ..engine.cascade import Budget, CascadeRule, Fit, expected_cost, fit_rule, route
from ..engine.metrics import OVERALL, analyze
from ..engine.planner import plan
from ..report.cost import CASCADE_FILE
from .context import CascadeSpec, EvalContext, StageSpec

FORMAT = 1


@dataclass(frozen=True)
class StageRun:
    """One stage's evaluation, read from its run folder."""

    spec: StageSpec
    folder: Path
    rows: list[dict]  # results.jsonl
    validation: dict  # validation.json: ids, domains, malign, score
    meta: dict
    analysis: dict

    @property
    def passes(self) -> tuple[str, ...]:
        """The measured passes this monitor needs (``meta.json: detector_seconds`` keys)."""
        the_plan = plan(self.spec.detectors)
        return tuple(dict.fromkeys(the_plan.timing_key(d) for d in self.spec.detectors))

    def pass_seconds(self, name: str) -> float:
        """Measured seconds per conversation of one pass over this run's test rows."""
        secs = self.meta.get("detector_seconds") or {}
        n = self.meta.get("n_rows")
        if name not in secs or not isinstance(n, int) or n < 1:
            raise DataError(f"{self.folder / 'meta.json'}: field 'detector_seconds.{name}': missing (the measured "
                            f"seconds of the {name!r} pass); evaluate the run again")
        return float(secs[name]) / n


def stage_folder(stage: StageSpec) -> Path:
    return stage.run_root / "eval" / stage.monitor


def check_stage(i: int, stage: StageSpec) -> Path:
    """Stage ``i``'s eval folder holds what the cascade reads (one-line error naming the folder
    and what to run); checked for another run's stages before anything slow."""
    from ..report.runfolder import ANALYSIS, RESULTS, VALIDATION

    folder = stage_folder(stage)
    if not (folder / RESULTS).is_file() or not (folder / ANALYSIS).is_file():
        raise MoodguardError(f"{folder}: stage {i + 1} ({stage.label}) has not been evaluated: run `moodguard evaluate "
                             f"--recipe <its recipe> --monitors {stage.monitor}` (output_dir {stage.run_root}) first")
    if not (folder / VALIDATION).is_file():
        raise MoodguardError(f"{folder / VALIDATION}: missing: stage {i + 1} ({stage.label}) was evaluated before "
                             "monitors recorded their ID validation scores; evaluate it again")
    return folder


def check_other_runs(spec: CascadeSpec) -> None:
    """The stages of other runs are evaluated (this run's are evaluated by the same command)."""
    for i, st in enumerate(spec.stages):
        if not st.own:
            check_stage(i, st)


def read_stage(i: int, stage: StageSpec) -> StageRun:
    """Stage ``i``'s run folder (one-line errors naming the folder and what to run)."""
    from ..report.runfolder import ANALYSIS, META, RESULTS, VALIDATION, read_results

    folder = check_stage(i, stage)
    val = read_json(folder / VALIDATION, DataError)
    for key in ("ids", "domains", "malign", "score"):
        if not isinstance(val.get(key), list) or len(val[key]) != len(val.get("ids") or []):
            raise DataError(f"{folder / VALIDATION}: field '{key}': expected a list with one value per id")
    meta = read_json(folder / META, DataError) if (folder / META).is_file() else {}
    return StageRun(stage, folder, read_results(folder / RESULTS), val, meta, read_json(folder / ANALYSIS, DataError))


def _aligned(stages: list[StageRun], key: str, what: str) -> tuple[list, list[np.ndarray]]:
    """``(ids, each stage's scores on them)``, joined on the ids. Test rows (``key`` "rows"): every
    stage must have scored stage 1's rows (one-line error otherwise). ID validation rows
    ("validation"): the rows every stage scored (runs cut with other data settings overlap in
    part). A row's labels must agree in every stage."""
    first = stages[0]
    table = []
    for st in stages:
        if key == "rows":
            table.append({r["id"]: (float(r["score"]), (r["domain"], int(r["malign"]))) for r in st.rows})
        else:
            v = st.validation
            table.append({i: (float(s), (d, int(m))) for i, s, d, m in zip(v["ids"], v["score"], v["domains"],
                                                                            v["malign"])})
    ids = [r["id"] for r in first.rows] if key == "rows" else list(first.validation["ids"])
    if key == "rows":
        for k, got in enumerate(table[1:], 1):
            missing = [i for i in ids if i not in got]
            extra = [i for i in got if i not in table[0]]
            if missing or extra:
                raise DataError(f"{stages[k].folder}: stage {k + 1} ({stages[k].spec.label}) scored other {what} rows "
                                f"than stage 1 ({first.folder}): e.g. id {short_repr((missing or extra)[0])} "
                                f"({len(missing)} missing, {len(extra)} extra); evaluate the stages on the same "
                                "test rows (the same data source and data.max_test_* caps)")
    else:
        ids = [i for i in ids if all(i in got for got in table[1:])]
    for k, got in enumerate(table[1:], 1):
        wrong = next((i for i in ids if got[i][1] != table[0][i][1]), None)
        if wrong is not None:
            raise DataError(f"{stages[k].folder}: id {short_repr(wrong)}: field 'domain'/'malign': {got[wrong][1]} in "
                            f"stage {k + 1}, {table[0][wrong][1]} in stage 1")
    return ids, [np.array([got[i][0] for i in ids], dtype=np.float64) for got in table]


def marginal_costs(stages: Sequence[StageRun]) -> list[float]:
    """Seconds per conversation each stage adds for a row that reaches it: the passes it needs
    that no earlier stage of the same run has run, at their measured seconds."""
    out, done = [], set()
    for st in stages:
        run = Path(st.spec.run_root).resolve()
        out.append(sum(st.pass_seconds(p) for p in st.passes if (run, p) not in done))
        done |= {(run, p) for p in st.passes}
    return out


def fit_cascade(spec: CascadeSpec, stages: list[StageRun], registry) -> Fit:
    """The bands, fitted on the ID validation rows (rows of other domains dropped)."""
    from mood_data.console import progress

    ids, scores = _aligned(stages, "validation", "ID validation")
    val = stages[0].validation
    labels = dict(zip(val["ids"], zip(val["domains"], val["malign"])))
    budget = Budget(spec.max_escalation_rate, spec.max_cost_per_conversation, spec.fill_budget)
    return fit_rule(scores, [labels[i][1] for i in ids], [labels[i][0] for i in ids], marginal_costs(stages), budget,
                    fpr=spec.fpr, search=spec.search, grid_size=spec.grid_size, registry=registry,
                    progress=lambda it: progress(it, desc=f"cascade {spec.name}: band search", unit="chunk"))


def _group_rates(routed_reached: np.ndarray, domains: Sequence[str], malign: np.ndarray, registry) -> dict:
    """Share of rows leaving stage 1, per analysis group (ID safe, ID unsafe, each OOD domain)."""
    dom = np.asarray(list(domains), dtype=object)
    is_id = np.array([registry.is_id(d) for d in dom], dtype=bool)
    groups = {"id_safe": is_id & (malign == 0), "id": is_id & (malign == 1)}
    groups.update({d: (dom == d) & (malign == 1) for d in dict.fromkeys(dom[~is_id].tolist())})
    return {g: float(routed_reached[1][m].mean()) for g, m in groups.items() if m.any()}


def evaluate_cascade(ctx: EvalContext, *, n_boot: int = 1000, plots: bool = True) -> Path:
    """Fit and evaluate ``ctx.cascade`` from its stages' run folders; write ``<run>/eval/<name>/``
    with ``cascade.json`` (module doc). Returns the folder."""
    from mood_data.domains import load_registry
    from train.modeling import save_versions

    from ..engine.parallel import is_main
    from ..report.caveats import print_warnings
    from ..report.runfolder import write_run

    spec = ctx.cascade
    registry = load_registry(ctx.data.registry)
    stages = [read_stage(i, st) for i, st in enumerate(spec.stages)]
    fit = fit_cascade(spec, stages, registry)
    rule = fit.rule
    first = stages[0]
    ids = [r["id"] for r in first.rows]
    domains = [r["domain"] for r in first.rows]
    malign = np.array([int(r["malign"]) for r in first.rows])
    _, test_scores = _aligned(stages, "rows", "test")
    routed = route(rule, test_scores, f"{spec.name} (test rows)")
    val_ids, val_scores = _aligned(stages, "validation", "ID validation")
    val_routed = route(rule, val_scores, f"{spec.name} (ID validation rows)")
    labels = dict(zip(first.validation["ids"], zip(first.validation["domains"], first.validation["malign"])))
    val = {"ids": val_ids, "domains": [labels[i][0] for i in val_ids], "malign": [int(labels[i][1]) for i in val_ids]}
    marginal = marginal_costs(stages)
    cost = expected_cost(routed.reached, marginal)
    negatives = None
    if ctx.calibration_split == "validation":  # thresholds from the held-out ID slice, as for every monitor
        is_safe = np.array([registry.is_id(d) for d in val["domains"]]) & (np.asarray(val["malign"]) == 0)
        negatives = val_routed.score[is_safe]
    points = analyze(routed.score, domains, malign, registry=registry, fprs=ctx.fprs, n_boot=0, monitor=spec.name,
                     negatives=negatives)
    columns: dict[str, list] = {"stage": routed.stage.tolist()}
    for k, s in enumerate(test_scores):
        columns[f"score_stage{k + 1}"] = [float(v) if r else None for v, r in zip(s, routed.reached[k])]
    doc = {
        "format": FORMAT, "name": spec.name, "fpr": spec.fpr,
        "stages": [{"stage": k + 1, "label": st.spec.label, "monitor": st.spec.monitor,
                    "detectors": list(st.spec.detectors), "run": str(st.spec.run_root), "eval_folder": str(st.folder),
                    "device": st.meta.get("device"), "dtype": st.meta.get("dtype"), "params": st.meta.get("params"),
                    "passes": list(st.passes),
                    "seconds_per_conversation": sum(st.pass_seconds(p) for p in st.passes),
                    "marginal_seconds_per_conversation": marginal[k],
                    "overall_recall": (st.analysis.get(OVERALL) or {}).get("tpr"),
                    "id_recall": ((st.analysis.get("groups") or {}).get("id") or {}).get("tpr")}
                   for k, st in enumerate(stages)],
        "rule": rule.to_dict(),
        "fit": {**fit.report, "validation_rows_per_stage": [len(st.validation["ids"]) for st in stages]},
        "test": {
            "n_rows": len(ids),
            "reach": [float(r) for r in routed.reached.mean(axis=1)],
            "escalation_rate": [float(routed.reached[k + 1].mean()) for k in range(len(stages) - 1)],
            "decided": [float((routed.stage == k + 1).mean()) for k in range(len(stages))],
            "escalation_rate_by_group": _group_rates(routed.reached, domains, malign, registry),
            "cost_per_conversation": cost,
            "recall": {g: v["tpr"] for g, v in points["groups"].items()},
            OVERALL: points[OVERALL]["tpr"],
            "thresholds": points["thresholds"],
        },
    }
    devices = {st.meta.get("device") for st in stages}
    own = next((st for st in stages if st.spec.own), first)
    meta = {"monitor": spec.name, "recipe": ctx.name, "model": ctx.model.base, "params": own.meta.get("params"),
            "n_rows": len(ids), "seconds": cost * len(ids), "seconds_per_conversation": cost,
            "truncated_rows": own.meta.get("truncated_rows"), "versions": save_versions(),
            "predict_safe": ctx.score.predict_safe, "fusion": None,
            "device": own.meta.get("device") if len(devices) == 1 else " + ".join(sorted(map(str, devices))),
            "dtype": own.meta.get("dtype"), "settings": own.meta.get("settings"),
            "calibration_split": ctx.calibration_split,
            "cascade": {"stages": [s["label"] for s in doc["stages"]],
                        "escalation_rate": doc["test"]["escalation_rate"], "rule": doc["rule"],
                        "fit": {k: fit.report[k] for k in ("fpr", "n_id_safe", "n_id_unsafe", "escalation_rate")}}}
    folder = ctx.model.run_root / "eval" / spec.name
    write_run(folder, monitor=spec.name, ids=ids, conversations=[r["conversation"] for r in first.rows],
              domains=domains, malign=malign, score=routed.score, registry=registry, fprs=ctx.fprs, meta=meta,
              n_boot=n_boot, plots=plots, negatives=negatives, extra_columns=columns,
              validation={**val, "score": [float(v) for v in val_routed.score]},
              extra_files={CASCADE_FILE: doc})
    if is_main():
        print_warnings(read_json(folder / "analysis.json", DataError).get("warnings") or [], spec.name)
    return folder


def load_rule(folder: Path) -> CascadeRule:
    """The rule of an evaluated cascade folder (``cascade.json``), checked."""
    doc = read_json(folder / CASCADE_FILE, DataError)
    return CascadeRule.from_dict(folder / CASCADE_FILE, doc.get("rule"), len(doc.get("stages") or []))


__all__ = ["CASCADE_FILE", "StageRun", "check_other_runs", "check_stage", "evaluate_cascade", "fit_cascade", "load_rule",
           "marginal_costs", "read_stage", "stage_folder"]
