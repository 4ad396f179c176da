"""Fit detectors on the train split and evaluate monitors on the test split (one pass each).

Monitor names: detectors joined by ``+``, the first is the anchor (``guard+maha+ppl``).
Detectors: ``guard`` (guard log-odds of unsafe), ``maha`` (Mahalanobis on pooled guard
features), ``knn`` (k-th neighbour distance), ``energy`` / ``maxlogit`` (from the guard
logits), ``ppl`` (perplexity under the causal-LM adapter). Every score: higher = more unsafe.

Data use (nothing is ever fitted on test rows):

* the train split is cut into the same seeded ``train`` / ``validation`` slices as guard
  training (``train.data.train_validation_split``, ``data.validation_fraction``, seed 0);
* Mahalanobis / kNN fit on the SAFE rows of the ``train`` slice (streaming float64, one
  guard forward); the fitted statistics are cached under ``<run>/stats/<key>/``;
* fusion parameters fit on the ID ``validation`` slice (its detector scores are cached too).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError, RecipeError
from mood_data.readers import read_json

from .detectors.ensemble import ENSEMBLE_DETECTORS
from .forward import GuardBatch, SharedBackbone, adapter_hash, encode, guard_pass
from .judge import JUDGE_DETECTORS
from .perplexity import perplexity_pass

DETECTORS = ("guard", "maha", "ppl", "knn", "energy", "maxlogit")
# scored outside the one guard/LM pass (eval/detectors/ensemble.py, eval/judge.py)
EXTRA_DETECTORS = ENSEMBLE_DETECTORS + JUDGE_DETECTORS
ALL_DETECTORS = DETECTORS + EXTRA_DETECTORS
FEATURE_DETECTORS = ("maha", "knn")
STATS_VERSION = 1


# ----------------------------------------------------------------------------- names, keys
def parse_monitor(name: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in str(name).split("+"))
    bad = [p for p in parts if p not in ALL_DETECTORS]
    if not parts or bad or len(set(parts)) != len(parts):
        raise RecipeError(f"monitor {name!r}: expected detectors from {', '.join(ALL_DETECTORS)} joined by '+' "
                          f"(no repeats){'; unknown: ' + ', '.join(bad) if bad else ''}")
    return parts


def split_detectors(names: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """``(one-pass detectors, ensemble detectors, judge detectors)`` among ``names``, order kept."""
    names = list(names)
    return ([n for n in names if n in DETECTORS], [n for n in names if n in ENSEMBLE_DETECTORS],
            [n for n in names if n in JUDGE_DETECTORS])


def parse_monitors(names: Iterable[str] | str) -> list[str]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = ["+".join(parse_monitor(n)) for n in names]
    if not out:
        raise RecipeError("monitors: no monitor given")
    return out


def run_root(recipe) -> Path:
    return Path(recipe.output_dir)


def adapter_dirs(recipe) -> tuple[Path, Path | None]:
    """``(<run>/guard, <run>/lm or None)``; a missing guard adapter is a one-line error."""
    root = run_root(recipe)
    guard = root / "guard"
    if not (guard / "adapter_config.json").is_file() and len(recipe.guard.seeds) > 1:
        guard = root / f"guard-seed{recipe.guard.seeds[0]}"  # an ensemble run: the first member anchors
    if not (guard / "adapter_config.json").is_file():
        raise BundleError(f"{guard}: guard adapter not found (train it first: moodguard train guard --recipe ...)")
    lm = root / "lm"
    return guard, (lm if (lm / "adapter_config.json").is_file() else None)


def fingerprint(ids: Sequence[str], conversations: Sequence[str]) -> str:
    """sha256 over the (id, conversation) pairs of a slice, in order."""
    h = hashlib.sha256()
    for i, c in zip(ids, conversations):
        h.update(str(i).encode())
        h.update(b"\0")
        h.update(c.encode())
        h.update(b"\1")
    return h.hexdigest()


def cache_key(**parts) -> str:
    blob = json.dumps({"version": STATS_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- loading
@dataclass
class Loaded:
    backbone: SharedBackbone
    tokenizer: object
    guard_dir: Path
    lm_dir: Path | None
    guard_hash: str
    lm_hash: str | None


def load_backbone(recipe, guard_dir: Path | None = None, lm_dir: Path | None = None) -> Loaded:
    """Load the base ONCE with both adapters (see :class:`eval.forward.SharedBackbone`)."""
    from train.modeling import load_tokenizer, resolve_model

    if guard_dir is None:
        guard_dir, lm_dir = adapter_dirs(recipe)
    base = resolve_model(recipe.model)
    tok_src = recipe.tokenizer or (guard_dir if (Path(guard_dir) / "tokenizer_config.json").is_file() else base)
    tokenizer = load_tokenizer(tok_src, trust_remote_code=recipe.trust_remote_code)
    dtype = "float32" if recipe.dtype == "auto" else recipe.dtype
    backbone = SharedBackbone.from_pretrained(base, guard_dir, lm_dir, dtype=dtype,
                                              trust_remote_code=recipe.trust_remote_code)
    return Loaded(backbone, tokenizer, Path(guard_dir), None if lm_dir is None else Path(lm_dir),
                  adapter_hash(guard_dir), None if lm_dir is None else adapter_hash(lm_dir))


def load_train_slices(recipe, source=None):
    """The ID train split cut into the seeded ``train`` / ``validation`` slices."""
    from mood_data.load import load_splits
    from train.data import train_validation_split

    ds = load_splits(source or recipe.data.source, splits=("train",), registry=recipe.data.registry,
                     template=recipe.data.template)["train"]
    parts = train_validation_split(ds, recipe.data.validation_fraction, seed=0, max_rows=recipe.data.max_train_rows)
    return parts["train"], parts["validation"]


# ----------------------------------------------------------------------------- scoring
def guard_scores(logits: np.ndarray, predict_safe: bool = False) -> np.ndarray:
    """Log-odds of unsafe from the guard logits (1 label: the logit). ``predict_safe``: the
    head was trained to output 'safe' (mood-bench's released adapters) -> negate."""
    from .detectors.logits import guard_margin

    z = np.asarray(logits, dtype=np.float64)
    s = z[:, 0].copy() if z.shape[1] == 1 else guard_margin(z)
    return -s if predict_safe else s


def logit_detectors(logits: np.ndarray, wanted: Iterable[str], predict_safe: bool = False) -> dict[str, np.ndarray]:
    from .detectors.logits import energy, max_logit

    out = {}
    for name in wanted:
        if name == "guard":
            out[name] = guard_scores(logits, predict_safe)
        elif name == "energy":
            out[name] = energy(logits)
        elif name == "maxlogit":
            out[name] = max_logit(logits)
    return out


class FeatureScorer:
    """``on_batch`` callback: scores each batch's pooled features with the fitted feature
    detectors (summed over layers) and keeps only the scores."""

    def __init__(self, n: int, detectors: dict[str, dict[int, object]]):
        self.detectors = detectors
        self.scores = {name: np.zeros(n, dtype=np.float64) for name in detectors}

    def __call__(self, batch: GuardBatch) -> None:
        for name, per_layer in self.detectors.items():
            self.scores[name][batch.index] = sum(det.score(batch.features[layer]) for layer, det in per_layer.items())


@dataclass(frozen=True)
class ScoreSettings:
    """What scoring needs from a recipe (also stored in a bundle's monitor.json)."""

    max_length: int
    batch_size: int
    pooling: str = "last"
    assistant_only: bool = False
    predict_safe: bool = False

    @classmethod
    def from_recipe(cls, recipe, predict_safe: bool = False) -> "ScoreSettings":
        ev = recipe.eval
        return cls(ev.max_length, ev.batch_size, ev.mahalanobis.pooling, ev.perplexity.assistant_only, predict_safe)


def score_rows(loaded: Loaded, conversations: Sequence[str], detectors: dict[str, dict[int, object]],
               wanted: Iterable[str], settings: ScoreSettings, desc: str = "",
               truncated: list[int] | None = None,
               seconds: dict[str, float] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """One guard forward (+ one LM forward if ``ppl`` is wanted) over ``conversations``.

    Returns every wanted detector's scores (original order) and the number of truncated rows;
    ``truncated`` (a list), when given, is extended with the indices of those rows;
    ``seconds`` (a dict), when given, gets the wall time of each pass (``guard``, ``ppl``).
    """
    seconds = {} if seconds is None else seconds
    wanted = list(dict.fromkeys(wanted))
    # one tokenisation for both passes (the assistant-token mask only when perplexity needs it)
    enc = encode(loaded.tokenizer, conversations, settings.max_length,
                 assistant_only=settings.assistant_only and "ppl" in wanted)
    if truncated is not None:
        truncated.extend(enc.truncated)
    feats = {k: v for k, v in detectors.items() if k in wanted}
    layers = sorted({layer for per in feats.values() for layer in per})
    scorer = FeatureScorer(len(conversations), feats)
    out: dict[str, np.ndarray] = {}
    if any(w != "ppl" for w in wanted):
        t0 = time.perf_counter()
        logits = guard_pass(loaded.backbone, enc, batch_size=settings.batch_size, layers=layers,
                            pooling=settings.pooling, on_batch=scorer if feats else None,
                            desc=f"guard forward{desc}")
        out.update(logit_detectors(logits, wanted, settings.predict_safe))
        out.update(scorer.scores)
        seconds["guard"] = time.perf_counter() - t0
    if "ppl" in wanted:
        t0 = time.perf_counter()
        out["ppl"] = perplexity_pass(loaded.backbone, enc, batch_size=settings.batch_size, desc=f"LM forward{desc}")
        seconds["ppl"] = time.perf_counter() - t0
    return {w: out[w] for w in wanted}, enc.n_truncated


# ----------------------------------------------------------------------------- fitting
def _stats_parts(recipe, loaded: Loaded, kind: str, layer: int, fp: str) -> dict:
    m = recipe.eval.mahalanobis
    parts = {"kind": kind, "model": recipe.model, "adapter": loaded.guard_hash, "layer": int(layer),
             "pooling": m.pooling, "max_length": recipe.eval.max_length, "data": fp}
    if kind == "maha":
        parts.update(estimator=m.estimator, variant=m.variant, ridge=m.ridge)
    else:
        parts.update(k=recipe.eval.knn.k, max_ref=recipe.eval.knn.max_ref)
    return parts


def _detector_class(kind: str):
    from .detectors import KNNDetector, MahalanobisDetector

    return MahalanobisDetector if kind == "maha" else KNNDetector


def load_stats(directory: Path, kind: str, name: str | None = None):
    """A fitted ``kind`` detector (``maha`` / ``knn``) saved as ``<directory>/<name or kind>.*``."""
    return _detector_class(kind).load(directory, name or kind)


def fit_feature_detectors(recipe, loaded: Loaded, rows, kinds: Sequence[str] = FEATURE_DETECTORS) -> dict[str, dict[int, Path]]:
    """Fit (or take from the cache) every ``kind`` x layer; ONE guard forward for all misses."""
    from .detectors import KNNDetector, MahalanobisFitter

    m = recipe.eval.mahalanobis
    layers = [int(x) for x in m.layers]
    fp = fingerprint(rows["id"], rows["conversation"])
    stats_root = run_root(recipe) / "stats"
    dirs: dict[str, dict[int, Path]] = {k: {} for k in kinds}
    todo: list[tuple[str, int, Path, dict]] = []
    for kind in kinds:
        for layer in layers:
            parts = _stats_parts(recipe, loaded, kind, layer, fp)
            d = stats_root / cache_key(**parts)
            dirs[kind][layer] = d
            if (d / "meta.json").is_file():
                try:
                    load_stats(d, kind)
                    continue  # cache hit
                except BundleError:
                    pass  # unreadable cache entry: refit
            todo.append((kind, layer, d, parts))
    if not todo:
        return dirs
    malign = np.asarray(rows["malign"], dtype=np.int64)
    fitters = {(k, layer): MahalanobisFitter(m.variant) for k, layer, _, _ in todo if k == "maha"}
    knn_feats: dict[int, list] = {layer: [] for k, layer, _, _ in todo if k == "knn"}

    def update(batch: GuardBatch) -> None:
        y = malign[batch.index]
        for (_, layer), f in fitters.items():
            f.update(batch.features[layer], y)
        for layer, acc in knn_feats.items():
            acc.append(batch.features[layer][y == 0].float().numpy())

    enc = encode(loaded.tokenizer, list(rows["conversation"]), recipe.eval.max_length)
    guard_pass(loaded.backbone, enc, batch_size=recipe.eval.batch_size, layers=sorted({t[1] for t in todo}),
               pooling=m.pooling, on_batch=update, desc="fit: guard forward")
    for kind, layer, d, parts in todo:
        if kind == "maha":
            det = fitters[(kind, layer)].finalize(m.estimator, m.ridge, metadata=parts)
        else:
            x = np.concatenate(knn_feats[layer]) if knn_feats[layer] else np.zeros((0, 1))
            k = min(recipe.eval.knn.k, max(len(x), 1))
            det = KNNDetector.fit(x, k=k, max_ref=recipe.eval.knn.max_ref, metadata=parts)
        with atomic.atomic_dir(d) as tmp:
            det.save(tmp, kind)
            atomic.write_json(tmp / "meta.json", {"kind": kind, "key": d.name, "parts": parts,
                                                  "n_rows": len(enc.input_ids), "truncated_rows": enc.n_truncated})
    return dirs


def fit_detectors(recipe, *, source=None, loaded: Loaded | None = None, predict_safe: bool = False) -> dict:
    """Fit Mahalanobis + kNN on the safe train rows (cached) and score the ID validation slice
    with every detector (cached) for fusion. Returns ``{"stats": {kind: {layer: dir}},
    "calibration": path}``."""
    loaded = loaded or load_backbone(recipe)
    train_rows, val_rows = load_train_slices(recipe, source)
    stat_dirs = fit_feature_detectors(recipe, loaded, train_rows)
    calib = calibration_scores(recipe, loaded, val_rows, stat_dirs, predict_safe=predict_safe)
    return {"stats": stat_dirs, "calibration": calib}


def calibration_scores(recipe, loaded: Loaded, rows, stat_dirs, *, predict_safe: bool = False) -> Path:
    """Every detector's scores on the ID validation slice (cached by key)."""
    from safetensors.numpy import save_file

    parts = {"kind": "calibration", "stats": {k: {str(layer): d.name for layer, d in v.items()} for k, v in stat_dirs.items()},
             "guard": loaded.guard_hash, "lm": loaded.lm_hash, "predict_safe": predict_safe,
             "assistant_only": recipe.eval.perplexity.assistant_only, "max_length": recipe.eval.max_length,
             "data": fingerprint(rows["id"], rows["conversation"])}
    d = run_root(recipe) / "stats" / f"calibration-{cache_key(**parts)}"
    if (d / "scores.safetensors").is_file():
        return d
    dets = {k: {layer: load_stats(p, k) for layer, p in v.items()} for k, v in stat_dirs.items()}
    scores, _ = score_rows(loaded, list(rows["conversation"]), dets, DETECTORS,
                           ScoreSettings.from_recipe(recipe, predict_safe), desc=" (ID validation)")
    scores["malign"] = np.asarray(rows["malign"], dtype=np.float64)
    with atomic.atomic_dir(d) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in scores.items()}, str(tmp / "scores.safetensors"))
        atomic.write_json(tmp / "meta.json", {"parts": parts, "domains": list(rows["domain"]), "ids": list(rows["id"])})
    return d


def read_calibration(d: Path) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    from safetensors.numpy import load_file

    t = load_file(str(d / "scores.safetensors"))
    meta = read_json(d / "meta.json", BundleError)
    malign = t.pop("malign").astype(np.int64)
    return t, malign, meta["domains"]


def cached_scores(recipe, kind: str, parts: dict, compute) -> dict[str, np.ndarray]:
    """Extra detectors' scores on the ID validation slice (``compute() -> {name: scores}``),
    cached under ``<run>/stats/calibration-<kind>-<key>/`` like :func:`calibration_scores`."""
    from safetensors.numpy import load_file, save_file

    d = run_root(recipe) / "stats" / f"calibration-{kind}-{cache_key(kind=kind, **parts)}"
    if (d / "scores.safetensors").is_file():
        return {k: v.astype(np.float64) for k, v in load_file(str(d / "scores.safetensors")).items()}
    scores = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in compute().items()}
    with atomic.atomic_dir(d) as tmp:
        save_file(scores, str(tmp / "scores.safetensors"))
        atomic.write_json(tmp / "meta.json", {"kind": kind, "parts": parts})
    return scores


def extra_detector_scores(recipe, loaded: Loaded, needed: Sequence[str], conversations: Sequence[str] | None,
                          source=None, predict_safe: bool = False) -> list[dict]:
    """Ensemble and judge detectors among ``needed``: per group ``{"group", "calibration":
    {name: ID-validation scores}, "test": {name: scores}, "seconds"}`` (test scoring time; no
    ``test`` / ``seconds`` when ``conversations`` is None) plus what the group was scored with
    (ensemble: ``members``, the member folders; judge: ``judge``, ``rubrics``)."""
    out = []
    _, ens, jud = split_detectors(needed)
    if ens or jud:
        train_rows, val_rows = load_train_slices(recipe, source)
    if ens:
        from .detectors.ensemble import score_for_eval

        out.append(score_for_eval(recipe, loaded, ens, conversations, val_rows, predict_safe))
    if jud:
        from .judge import score_for_eval as judge_for_eval

        out.append(judge_for_eval(recipe, loaded, jud, conversations, train_rows, val_rows))
    return out


# ----------------------------------------------------------------------------- fusion
def fit_fusion(method: str, calib: dict[str, np.ndarray], malign: np.ndarray, domains: Sequence[str],
               detectors: Sequence[str], registry=None):
    """Fit the fusion of ``detectors`` (first = anchor) on the ID rows of the calibration slice;
    :class:`eval.fusion.Fusion` drops any non-ID row before fitting."""
    from mood_data.domains import DEFAULT_REGISTRY

    from .fusion import Fusion

    scores = {k: np.asarray(calib[k], dtype=np.float64) for k in detectors}
    return Fusion.fit(method, scores, malign, list(domains), registry=registry or DEFAULT_REGISTRY,
                      anchor=detectors[0])


# ----------------------------------------------------------------------------- evaluate
def evaluate_recipe(recipe, monitors: Sequence[str] | None = None, source=None, *, predict_safe: bool = False,
                    loaded: Loaded | None = None, n_boot: int = 1000, plots: bool = True) -> dict[str, Path]:
    """Score the test split ONCE (one guard + one LM forward) and write ``<run>/eval/<monitor>/``
    for every monitor. Fits / reuses detector statistics first (see :func:`fit_detectors`)."""
    from mood_data.domains import load_registry
    from mood_data.load import cap_groups, load_splits
    from train.modeling import count_parameters, save_versions

    from .runfolder import write_run

    monitors = parse_monitors(monitors or recipe.eval.monitors)
    needed = sorted({d for m in monitors for d in parse_monitor(m)}, key=ALL_DETECTORS.index)
    loaded = loaded or load_backbone(recipe)
    if "ppl" in needed and loaded.lm_dir is None:
        raise BundleError(f"{run_root(recipe) / 'lm'}: causal-LM adapter not found (needed for 'ppl' monitors)")
    fitted = fit_detectors(recipe, source=source, loaded=loaded, predict_safe=predict_safe)
    registry = load_registry(recipe.data.registry)
    test = load_splits(source or recipe.data.source, splits=("test",), registry=recipe.data.registry,
                       template=recipe.data.template)["test"]
    test = cap_groups(test, recipe.data.max_test_unsafe_per_domain, recipe.data.max_test_safe_per_domain)
    # plain lists once: iterating a datasets column decodes row by row, on every access
    test = {c: list(test[c]) for c in ("id", "conversation", "domain", "malign")}
    dets = {k: {layer: load_stats(p, k) for layer, p in v.items()} for k, v in fitted["stats"].items()}
    cut: list[int] = []
    detector_seconds: dict[str, float] = {}  # wall time of each pass over the test rows
    scores, n_trunc = score_rows(loaded, test["conversation"], dets, split_detectors(needed)[0],
                                 ScoreSettings.from_recipe(recipe, predict_safe), desc=" (test)", truncated=cut,
                                 seconds=detector_seconds)
    calib, cal_malign, cal_domains = read_calibration(fitted["calibration"])
    pass_of = {d: ("ppl" if d == "ppl" else "guard") for d in DETECTORS}
    for extra in extra_detector_scores(recipe, loaded, needed, test["conversation"], source, predict_safe):
        scores.update(extra["test"])
        calib.update(extra["calibration"])
        detector_seconds[extra["group"]] = extra["seconds"]
        pass_of.update({d: extra["group"] for d in extra["test"]})
    params = count_parameters(loaded.backbone.model)
    n_rows = len(test["id"])
    out: dict[str, Path] = {}
    for name in monitors:
        parts = parse_monitor(name)
        fz = fit_fusion(recipe.eval.fusion, calib, cal_malign, cal_domains, parts, registry)
        fused = np.asarray(fz.apply({k: scores[k] for k in parts}), dtype=np.float64)
        # what this monitor alone costs: the passes its detectors need (guard pass = logits +
        # pooled features + every feature detector; ppl = the LM adapter's forward)
        seconds = sum(detector_seconds.get(p, 0.0) for p in {pass_of[d] for d in parts})
        meta = {"monitor": name, "recipe": recipe.name, "model": recipe.model, "params": params,
                "n_rows": n_rows, "seconds": seconds, "seconds_per_conversation": seconds / max(n_rows, 1),
                "truncated_rows": n_trunc, "versions": save_versions(), "predict_safe": predict_safe,
                "fusion": recipe.eval.fusion, "detector_seconds": detector_seconds}
        folder = run_root(recipe) / "eval" / name
        write_run(folder, monitor=name, ids=test["id"], conversations=test["conversation"],
                  domains=test["domain"], malign=np.asarray(test["malign"]), score=fused,
                  detector_scores=scores, registry=registry,
                  fprs=tuple(recipe.eval.fprs), meta=meta, n_boot=n_boot, plots=plots, truncated=cut)
        out[name] = folder
    return out


__all__ = [
    "DETECTORS", "Loaded", "ScoreSettings", "adapter_dirs", "cache_key", "calibration_scores", "evaluate_recipe", "fingerprint",
    "fit_detectors", "fit_feature_detectors", "fit_fusion", "guard_scores", "load_backbone", "load_stats",
    "load_train_slices", "parse_monitor", "parse_monitors", "read_calibration", "score_rows", "split_detectors",
]
