"""A run's judge: ``judge.model`` (any instruct model; default the recipe's model) with the judge
LoRA (``judge.adapter`` or ``<run>/judge``) if there is one, its rubrics and few-shot examples,
and the judge detectors' cached ID-validation and test scores (the pass and the loaded
:class:`~eval.engine.judge_pass.Judge`: :mod:`eval.engine.judge_pass`; the detectors:
:mod:`eval.engine.detectors.judge`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mood_data.errors import BundleError
from train.judge_prompts import Rubric, load_rubrics, select_shots

from ..engine.judge_pass import Judge
from ..engine.planner import plan, score_judge
from ..engine.table import DETECTORS
from .backbone import Loaded
from .cache import cached_scores, fingerprint
from .context import EvalContext, JudgeSpec


def judge_adapter_dir(spec: JudgeSpec, run_root: Path) -> Path | None:
    """``judge.adapter`` if set, else ``<run>/judge`` when it holds an adapter, else None."""
    d = Path(spec.adapter) if spec.adapter else Path(run_root) / "judge"
    if (d / "adapter_config.json").is_file():
        return d
    if spec.adapter:
        raise BundleError(f"{d}: judge adapter not found (key 'judge.adapter')")
    return None


def rubrics_of(spec: JudgeSpec, names: Sequence[str]) -> dict[str, Rubric]:
    """The rubrics ``names`` (``alignment`` / ``uncertainty``): the judge section's files, else
    the packaged ones."""
    return load_rubrics(spec.alignment_rubric, spec.uncertainty_rubric, names)


def load_judge(ctx: EvalContext, loaded: Loaded | None, train_rows) -> Judge:
    """The run's judge. When it shares the guard's base (``loaded``), its LoRA is one more adapter
    on the already loaded base; else its own base goes where the guard's went (the one device
    policy). Few-shot examples come from ``train_rows`` (the train slice)."""
    from train.modeling import load_tokenizer, resolve_model

    from ..engine.forward import SharedBackbone, adapter_hash

    spec, model_spec = ctx.judge, ctx.model
    model = spec.model or model_spec.base
    adapter_dir = judge_adapter_dir(spec, model_spec.run_root)
    if adapter_dir is None and spec.model is None:
        raise BundleError(f"{model_spec.run_root / 'judge'}: no judge adapter and 'judge.model' is not set: train "
                          "one (moodguard train judge --recipe R judge.enabled=true) or set judge.model to an instruct model")
    if loaded is not None and resolve_model(model) == resolve_model(model_spec.base):
        backbone = loaded.backbone
    else:
        where = getattr(getattr(loaded, "backbone", None), "placement", None)
        if where is None:  # where the device policy puts this model
            from train.device import placement

            where = placement(model_spec.dtype, model_spec.device, model_spec.device_map)
        backbone = SharedBackbone.from_pretrained(resolve_model(model), placement=where,
                                                  trust_remote_code=model_spec.trust_remote_code)
    name = None
    if adapter_dir is not None:
        name = "judge"
        if not (hasattr(backbone.model, "peft_config") and name in backbone.model.peft_config):
            backbone.add_adapter(name, adapter_dir)
    tok_src = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else model
    tokenizer = load_tokenizer(tok_src, trust_remote_code=model_spec.trust_remote_code)
    shots = select_shots(train_rows, spec.n_shots, seed=spec.shot_seed, max_chars=spec.shot_max_chars)
    return Judge(backbone, name, tokenizer, str(model), adapter_dir,
                 None if adapter_dir is None else adapter_hash(adapter_dir), shots, spec.max_length)


def calibration(ctx: EvalContext, judge: Judge, rubrics: Mapping[str, Rubric], val_rows) -> dict[str, np.ndarray]:
    """The judge detectors' scores on the ID validation slice (cached per detector, judge model,
    adapter, rubric, shots and slice)."""
    calib = {}
    for det in ctx.plan.judge:
        rub = rubrics[DETECTORS[det].rubric]
        parts = {"detector": det, "model": judge.model, "adapter": judge.adapter_hash, "rubric": rub.sha256,
                 "shots": [s["id"] for s in judge.shots], "max_length": judge.max_length,
                 "data": fingerprint(val_rows["id"], val_rows["conversation"])}
        calib.update(cached_scores(ctx.stats_root, "judge", parts, lambda det=det: score_judge(
            plan([det]), judge, rubrics, list(val_rows["conversation"]), ctx.score.batch_size, " (ID validation)")[0]))
    return calib


def score_for_eval(ctx: EvalContext, loaded: Loaded, conversations: Sequence[str] | None, train_rows, val_rows) -> dict:
    """Cached ID-validation scores of the judge detectors the monitors use, the loaded judge and
    its rubrics, and (unless ``conversations`` is None) their test scores (see
    :func:`eval.run.fitting.extra_detector_scores`). Shots come from ``train_rows``."""
    wanted = ctx.plan.judge
    judge = load_judge(ctx, loaded, train_rows)
    rubrics = rubrics_of(ctx.judge, sorted({DETECTORS[d].rubric for d in wanted}))
    out = {"group": "judge", "calibration": calibration(ctx, judge, rubrics, val_rows), "judge": judge,
           "rubrics": rubrics}
    if conversations is not None:
        t0 = time.perf_counter()
        out["test"], out["info"] = score_judge(ctx.plan, judge, rubrics, conversations, ctx.score.batch_size, " (test)")
        out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["calibration", "judge_adapter_dir", "load_judge", "rubrics_of", "score_for_eval"]
