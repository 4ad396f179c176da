"""A monitor bundle: ONE folder with everything needed to score new conversations.

Layout (``moodguard export``)::

    <bundle>/monitor.json        monitor name, detectors, base model, scoring settings
    <bundle>/guard/              guard adapter (adapter_config.json, adapter_model.safetensors)
    <bundle>/lm/                 causal-LM adapter (only when the monitor uses ``ppl``)
    <bundle>/tokenizer/          the tokenizer files
    <bundle>/stats/<det>-layer<L>.{safetensors,json}   fitted detector statistics
    <bundle>/members/guard-seed<S>/   the other ensemble members (ensemble-* monitors; the
                                 anchor member is guard/)
    <bundle>/judge/              judge-* monitors: adapter/ (the judge LoRA, if any),
                                 tokenizer/, rubrics/<name>.yaml; monitor.json's "judge"
                                 holds the judge base (null = the guard's base), its few-shot
                                 examples (ID train rows) and the prompt length
    <bundle>/fusion.json         fitted fusion parameters (eval.engine.fusion.Fusion)
    <bundle>/thresholds.json     fused-score thresholds at the chosen FPRs + where they came from
    <bundle>/recipe.yaml         the fully resolved recipe
    <bundle>/lineage.json        where it came from: parent bundle (sha256 of its manifest), data
                                 fingerprints, refresh mode, gate figures, code version
                                 (:mod:`eval.run.lineage`; ``moodguard lineage``)
    <bundle>/moodguard-bundle.json   the marker: with the manifest, what tells ``export`` that an
                                 existing folder is a bundle it wrote (which it may replace)
    <bundle>/manifest.json       sha256 of every other file

The base model itself is referenced (``monitor.json: base``), not copied. Thresholds are the
``analysis.json`` thresholds of ``<run>/eval/<monitor>/``: quantiles of the fused score on
the ID-safe rows of the test split (mood-bench's definition; ID data only, no OOD row).
Loading verifies the manifest first: a missing or modified file is a one-line BundleError.
The check and the load use the same bytes: each file is read once (no symlink followed),
hashed while it is copied into a private ``mkdtemp`` folder, and only that copy is loaded
(:func:`staged_bundle`), so a file swapped after the check is never used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError, DataError, OutputError
from mood_data.readers import read_json, sha256_file
from mood_data.render import is_blank
from train.recipe_schema import recipe_yaml

from ..engine.adapters import check_adapter, check_context, check_vocab
from ..engine.planner import (ScoreSettings, first_non_finite, plan, score_judge, score_members, score_shared,
                              unscorable_reason)
from ..engine.table import fitted as fitted_names
from .backbone import Loaded, adapter_dirs, load_backbone
from .bundle_check import (FORMAT, adapter_folders, check_monitor_spec, check_thresholds, files_on_disk, staged_bundle,
                           verify_manifest)
from .cache import read_calibration
from .context import EvalContext
from .ensemble import member_names
from .fitting import extra_detector_scores, fit_statistics, load_stats
from .lineage import LINEAGE, root_lineage

MANIFEST = "manifest.json"
MARKER = "moodguard-bundle.json"  # with the manifest: "a bundle this tool wrote" (export may replace it)
# the ``unscorable`` reason of an empty or all-whitespace conversation (``[]`` messages too)
EMPTY_CONVERSATION = "empty conversation: no text to score (flagged at every FPR: fail closed)"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_manifest(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)  # a nested one is a file
    doc = {"format": FORMAT, "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}}
    return atomic.write_json(folder / MANIFEST, doc)


# ----------------------------------------------------------------------------- export
def own_bundle_files(folder: Path) -> set[str] | None:
    """The relative paths of the files of ``folder`` if it is a bundle this tool wrote (a real
    folder with the marker and a manifest, every file in it the marker, the manifest or listed
    by it, no symlink or special file); else None."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None
        marker, mpath = folder / MARKER, folder / MANIFEST
        if marker.is_symlink() or mpath.is_symlink() or not (marker.is_file() and mpath.is_file()):
            return None
        listed = json.loads(mpath.read_text(encoding="utf-8")).get("files")
        if json.loads(marker.read_text(encoding="utf-8")).get("moodguard_bundle") != FORMAT or \
                not isinstance(listed, dict):
            return None
        files = files_on_disk(folder)
    except (OSError, ValueError, AttributeError, BundleError):
        return None
    return files | {MANIFEST} if files <= set(listed) else None


def check_export_out(out: str | Path, overwrite: bool = False, protect: Sequence[str | Path] = ()) -> str:
    """What ``export --out`` would replace: ``"new"`` (nothing there), ``"empty"`` (an empty
    folder), ``"bundle"`` (a bundle this tool wrote: its own files are deleted) or ``"other"``
    (only with ``overwrite``: moved aside, never deleted). Refused (one-line OutputError): a
    folder holding one of ``protect`` (the working folder, the run being exported), even with
    ``overwrite``; anything else that exists, without ``overwrite``."""
    out = Path(out)
    here = Path(os.path.abspath(out))
    for p in protect:
        for a, b in ((Path(os.path.abspath(p)), here), (Path(p).resolve(), out.resolve())):
            if a == b or b in a.parents:
                raise OutputError(f"{out}: --out holds the {'working folder' if Path(p) == Path.cwd() else 'run'} "
                                  f"{p} (refused, even with --overwrite: choose another folder)")
    if not os.path.lexists(out):
        return "new"
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return "empty"
    if own_bundle_files(out) is not None:
        return "bundle"
    if overwrite:
        return "other"
    if out.is_symlink():
        what = "a symlink"
    elif not out.is_dir():
        what = "a file"
    else:
        names = sorted(p.name for p in out.iterdir())
        what = f"a folder that is not a moodguard bundle ({len(names)} entries, e.g. {names[0]!r})"
    raise OutputError(f"{out}: --out exists and is {what}: refused (pass --overwrite to write the bundle there; "
                      "what is there now is moved aside, never deleted)")


def _aside(path: Path, name: str) -> Path:
    """A free sibling name ``<name>.moodguard-old-<time>[-k]`` for a replaced folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        p = path.with_name(f"{name}.moodguard-old-{stamp}{'' if k == 0 else f'-{k}'}")
        if not os.path.lexists(p):
            return p
    raise OutputError(f"{path}: no free name to move the old folder to")  # pragma: no cover


def dispose_replaced(out: Path) -> Callable[[Path], None]:
    """How ``export`` disposes of what was at ``out`` (moved to ``old`` by the swap): a bundle
    it wrote loses its own files (and then its empty folders); anything else, or whatever is
    left, is moved to a visible sibling ``<out>.moodguard-old-<time>`` and said, never deleted."""
    def dispose(old: Path) -> None:
        own = own_bundle_files(old)
        if own is not None:
            for rel in own:
                with contextlib.suppress(FileNotFoundError):
                    (old / rel).unlink()
            for root, dirs, _ in sorted(os.walk(old, topdown=False), key=lambda t: -len(t[0])):
                for d in dirs:
                    with contextlib.suppress(OSError):
                        (Path(root) / d).rmdir()
            with contextlib.suppress(OSError):
                old.rmdir()
        if os.path.lexists(old) and not (old.is_dir() and not old.is_symlink() and not any(old.iterdir())):
            aside = _aside(out, out.name)
            os.rename(old, aside)
            print(f"export: what was at {out} is now at {aside} (moved aside, not deleted)", file=sys.stderr)
        elif os.path.lexists(old):
            old.rmdir()

    return dispose


def _copy_adapter(src: Path, dst: Path) -> None:
    """The adapter files of ``src`` (config + safetensors weights, nothing else) into ``dst``."""
    dst.mkdir(parents=True)
    for f in ADAPTER_FILES:
        shutil.copy2(Path(src) / f, dst / f)


def export(ctx: EvalContext, out_dir: str | Path, *, overwrite: bool = False, cut=None,
           lineage: dict | None = None) -> Path:
    """Write the bundle of the one monitor of ``ctx`` (evaluating it first if needed).
    ``out_dir`` may be new, empty or a bundle this tool wrote; anything else only with
    ``overwrite`` (moved aside, never deleted): :func:`check_export_out`. ``cut``: the
    ``(train, validation)`` slices to fit on (default: the data's seeded cut; a refresh passes
    its old + new slices); ``lineage``: its ``lineage.json`` (default: a root, from ``cut``)."""
    from mood_data.domains import load_registry
    from mood_data.sources import check_source

    from .evaluate import evaluate, fit_fusion
    from .splits import data_cut, eval_splits
    from .hub import bundle_card

    (monitor, detectors), = ctx.monitors.items()
    protect = (Path.cwd(), ctx.model.run_root)
    check_export_out(out_dir, overwrite, protect)  # before the (slow) evaluation
    check_source(ctx.data.source)  # a missing data file first, not a missing adapter
    guard_dir, lm_dir = adapter_dirs(ctx.model)
    the_plan = ctx.plan
    if the_plan.lm and lm_dir is None:
        raise BundleError(f"{ctx.model.run_root / 'lm'}: causal-LM adapter not found (monitor {monitor!r} uses "
                          f"{the_plan.lm[0]!r})")
    eval_dir = ctx.model.run_root / "eval" / monitor
    apath = eval_dir / "analysis.json"
    meta_path = eval_dir / "meta.json"
    fresh = apath.is_file() and meta_path.is_file() and \
        read_json(meta_path, BundleError).get("predict_safe", False) == ctx.score.predict_safe
    loaded = load_backbone(ctx.model, guard_dir, lm_dir)  # once, for evaluate, fit and the extra detectors
    if fresh:
        cut = cut or data_cut(ctx.data)  # once, likewise
    else:  # evaluate needs the test split: the cut comes from the same read
        splits, own_cut = eval_splits(ctx.data)
        cut = cut or own_cut
        evaluate(ctx, loaded, splits, cut)
    analysis = read_json(apath, BundleError)
    fitted = fit_statistics(ctx, loaded, cut)  # cache hits after evaluate
    calib, malign, domains = read_calibration(fitted["calibration"])
    # ensemble / judge: ID-validation scores (cache hits after evaluate) and what they were scored with
    extras = extra_detector_scores(ctx, loaded, None, cut)
    for e in extras:
        calib.update(e["calibration"])
    fusion = fit_fusion(ctx.fusion, calib, malign, domains, detectors, load_registry(ctx.data.registry))
    settings = ctx.score
    out_dir = Path(out_dir)
    extra_spec: dict[str, Any] = {}
    check_export_out(out_dir, overwrite, protect)  # again: it may have changed meanwhile
    with atomic.atomic_dir(out_dir, dispose=dispose_replaced(out_dir)) as tmp:
        for e in extras:
            if "members" in e:  # the ensemble's other members
                names = member_names(e["members"], guard_dir)
                for d, name in zip(e["members"], names):
                    if name != "guard":  # the anchor is guard/ itself
                        _copy_adapter(d, tmp / "members" / name)
                extra_spec["ensemble"] = {"members": names}
            if "judge" in e:  # the judge: its LoRA, tokenizer, rubrics and few-shot examples
                judge, rubrics = e["judge"], e["rubrics"]
                jdir = tmp / "judge"
                (jdir / "rubrics").mkdir(parents=True)
                if judge.adapter_dir is not None:
                    _copy_adapter(judge.adapter_dir, jdir / "adapter")
                judge.tokenizer.save_pretrained(jdir / "tokenizer")
                for name, rub in rubrics.items():
                    shutil.copy2(rub.path, jdir / "rubrics" / f"{name}.yaml")
                extra_spec["judge"] = {
                    "model": None if judge.backbone is loaded.backbone else judge.model,
                    "adapter": judge.adapter_dir is not None, "max_length": judge.max_length,
                    "rubrics": sorted(rubrics), "shots": list(judge.shots),
                }
        for name, src in (("guard", guard_dir), ("lm", lm_dir if the_plan.lm else None)):
            if src is not None:
                _copy_adapter(src, tmp / name)
        loaded.tokenizer.save_pretrained(tmp / "tokenizer")  # the one the scores were computed with
        stats = {}
        for kind in fitted_names(detectors):
            for layer, d in fitted["stats"][kind].items():
                load_stats(d, kind).save(tmp / "stats", f"{kind}-layer{layer}")
                stats.setdefault(kind, []).append(int(layer))
        fusion.save(tmp / "fusion.json")
        atomic.write_json(tmp / "thresholds.json", {
            "thresholds": analysis["thresholds"], "fprs": analysis["fprs"], "n_id_safe": analysis["n_id_safe"],
            "source": f"ID-safe rows of the {(analysis.get('calibration') or {}).get('split', 'test')} split ({apath})",
        })
        atomic.write_text(tmp / "recipe.yaml", recipe_yaml(ctx.recipe_doc))
        atomic.write_json(tmp / "monitor.json", {
            "format": FORMAT, "monitor": monitor, "detectors": list(detectors), "base": str(ctx.model.base),
            "dtype": ctx.model.dtype, "device_map": ctx.model.device_map,
            "trust_remote_code": ctx.model.trust_remote_code, "stats": stats,
            "settings": {"max_length": settings.max_length, "batch_size": settings.batch_size,
                         "pooling": settings.pooling, "assistant_only": settings.assistant_only,
                         "predict_safe": settings.predict_safe},
            **extra_spec,
        })
        metrics = read_json(guard_dir / "metrics.json", BundleError) if (guard_dir / "metrics.json").is_file() else {}
        lineage = lineage if lineage is not None else root_lineage(monitor, cut)
        atomic.write_json(tmp / LINEAGE, lineage)
        card = bundle_card(out_dir, dict(ctx.recipe_doc), analysis, monitor, read_json(meta_path, BundleError), metrics,
                           lineage=lineage)
        atomic.write_text(tmp / "README.md", str(card))  # the model card, covered by the manifest
        atomic.write_json(tmp / MARKER, {"moodguard_bundle": FORMAT})
        write_manifest(tmp)
    return out_dir


def export_bundle(recipe, out_dir: str | Path, monitor: str = "guard+maha+ppl", *, source=None,
                  predict_safe: bool = False, device: str | None = None, overwrite: bool = False) -> Path:
    """Public entry (``moodguard export``, the API): the bundle of ``monitor`` of ``recipe``'s run
    (:func:`export` on the resolved context)."""
    from .context import resolve

    check_export_out(out_dir, overwrite, (Path.cwd(), Path(recipe.output_dir)))  # before anything slow
    return export(resolve(recipe, [monitor], source, predict_safe=predict_safe, device=device), out_dir,
                  overwrite=overwrite)


# ----------------------------------------------------------------------------- scoring
def check_feature_dims(folder: Path, spec: dict, dets: dict, backbone) -> None:
    """Every fitted feature detector must match the backbone's hidden size (a one-line
    BundleError naming the statistics file otherwise, instead of a shape error mid-scoring)."""
    config = backbone.model.config
    hidden = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", None)
    if hidden is None:
        return
    for kind, per_layer in dets.items():
        for layer, det in per_layer.items():
            d = getattr(det, "meta", {}).get("d")
            if d is not None and int(d) != int(hidden):
                raise BundleError(f"{folder / 'stats' / f'{kind}-layer{layer}.safetensors'}: field 'd': statistics "
                                  f"have dimension {d} but the backbone {spec['base']} has hidden size {hidden}")


class Monitor:
    """A loaded bundle: ``Monitor.load(dir).score(conversations) -> list[dict]``."""

    def __init__(self, folder: Path, spec: dict, loaded: Loaded, detectors: dict, fusion, thresholds: dict):
        self.folder, self.spec, self.loaded = folder, spec, loaded
        self.detectors, self.fusion, self.thresholds = detectors, fusion, thresholds
        self.manifest_sha256: str | None = None  # sha256 of the manifest verified at load
        self.judge = None  # eval.engine.judge_pass.Judge, for judge-* monitors
        self.rubrics: dict = {}
        s = spec["settings"]  # checked by bundle_check.check_monitor_spec
        self.settings = ScoreSettings(s["max_length"], s["batch_size"], s["pooling"], s["assistant_only"],
                                      s["predict_safe"])

    @property
    def name(self) -> str:
        return self.spec["monitor"]

    @classmethod
    def load(cls, folder: str | Path, *, base: str | None = None, batch_size: int | None = None,
             device: str | None = None, trust_remote_code: bool = False) -> "Monitor":
        """Verify the manifest and every value (:mod:`eval.run.bundle_check`), then load base (+
        adapters), detectors, fusion and thresholds; the base goes where the device policy puts
        it (``device`` = ``--device``; the bundle's dtype and ``device_map``). A bundle whose
        ``monitor.json`` asks for ``trust_remote_code`` is refused unless the caller passes
        ``trust_remote_code`` true (``--trust-remote-code``).

        Every file is read once: hashed while copied into a private folder, and only that copy
        is loaded (removed once everything is in memory)."""
        folder = Path(folder)
        with staged_bundle(folder) as (staged, _):  # load what was hashed, nothing read twice
            mon = cls._load_verified(staged, folder, base=base, batch_size=batch_size, device=device,
                                     trust_remote_code=trust_remote_code)
        return mon

    @classmethod
    def _load_verified(cls, staged: Path, folder: Path, *, base: str | None, batch_size: int | None,
                       device: str | None, trust_remote_code: bool) -> "Monitor":
        """:meth:`load` from ``staged``, the verified private copy of the bundle ``folder``."""
        from train import device as device_policy
        from train.modeling import load_tokenizer, resolve_model

        from ..engine.forward import SharedBackbone, adapter_hash
        from ..engine.fusion import Fusion

        spec = read_json(staged / "monitor.json", BundleError)
        names = check_monitor_spec(staged, spec, trust_remote_code=trust_remote_code)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise BundleError(f"--batch-size: must be >= 1, got {batch_size}")
        for adapter in adapter_folders(staged, spec, names):
            check_adapter(adapter)
        remote = spec.get("trust_remote_code", False) is True and trust_remote_code is True  # both: checked above
        dets = {kind: {int(layer): load_stats(staged / "stats", kind, f"{kind}-layer{layer}")
                       for layer in spec["stats"].get(kind, [])} for kind in fitted_names(names)}
        for kind, per in dets.items():
            if not per:
                raise BundleError(f"{staged / 'monitor.json'}: field 'stats.{kind}': no fitted layer")
        fusion = Fusion.load(staged / "fusion.json")
        if fusion.detectors != list(names):
            raise BundleError(f"{staged / 'fusion.json'}: field 'fusion.detectors': {fusion.detectors} != {list(names)}")
        thresholds = check_thresholds(staged)
        lm = staged / "lm" if plan(names).needs_lm_adapter else None
        where = device_policy.placement(spec.get("dtype", "float32"), device, spec.get("device_map"))
        backbone = SharedBackbone.from_pretrained(resolve_model(base or spec["base"]), staged / "guard", lm,
                                                  placement=where,
                                                  trust_remote_code=remote)
        check_feature_dims(staged, spec, dets, backbone)
        tok = load_tokenizer(staged / "tokenizer")
        base_name = base or spec["base"]
        check_vocab(folder / "tokenizer", tok, backbone.model, base_name)  # loaded from the copy, named as the bundle's
        check_context(folder / "monitor.json", "settings.max_length", spec["settings"]["max_length"], backbone.model,
                      base_name)
        loaded = Loaded(backbone, tok, folder / "guard", None if lm is None else folder / "lm",
                        adapter_hash(staged / "guard"), None if lm is None else adapter_hash(lm))
        mon = cls(folder, spec, loaded, dets, fusion, thresholds)
        mon.manifest_sha256 = sha256_file(staged / MANIFEST)  # the manifest that was checked
        for name in (spec.get("ensemble") or {}).get("members", []):
            if name != "guard":  # the anchor member is the guard adapter itself
                backbone.add_adapter(name, staged / "members" / name, head=True)
        if spec.get("judge"):
            judge, rubrics = _load_judge(staged, spec, backbone, base, remote)
            # the private copy is gone after loading: paths shown later name the bundle
            mon.judge = dataclasses.replace(judge, adapter_dir=None if judge.adapter_dir is None
                                            else folder / judge.adapter_dir.relative_to(staged))
            mon.rubrics = {n: dataclasses.replace(r, path=str(folder / Path(r.path).relative_to(staged)))
                           for n, r in rubrics.items()}
        if batch_size:
            mon.settings = ScoreSettings(mon.settings.max_length, batch_size, mon.settings.pooling,
                                         mon.settings.assistant_only, mon.settings.predict_safe)
        return mon

    def contributions(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each detector's additive share of the fused score where the fusion is linear
        (lambda, mean, logistic); otherwise its standardised score ``z``."""
        p = self.fusion.params
        names = self.fusion.detectors
        z = {n: (raw[n] - p["mu"][n]) / p["sigma"][n] for n in names}
        if p["method"] == "lambda":
            aux = [n for n in names if n != p["anchor"]]
            return {n: z[n] if n == p["anchor"] else p["lam"] * z[n] / len(aux) for n in names}
        if p["method"] == "mean":
            return {n: z[n] / len(names) for n in names}
        if p["method"] == "logistic":
            return {n: p["coef"][n] * z[n] for n in names}
        return z

    def unscorable_row(self, reason: str) -> dict:
        """The row of a conversation that cannot be scored: no score, flagged at every FPR (fail
        closed: never a finite score computed from padding), ``unscorable`` says why."""
        names = self.fusion.detectors
        return {"score": None, "detectors": dict.fromkeys(names), "contributions": dict.fromkeys(names),
                "flags": {k: True for k in self.thresholds}, "latency_s": 0.0, "truncated": False,
                "unscorable": reason}

    def raw_scores(self, conversations: Sequence[str], names: Sequence[str],
                   truncated: list[int] | None = None) -> dict[str, np.ndarray]:
        """The raw scores of the detectors ``names`` (any of the bundle's): only the passes they
        need run (``truncated``, when given, is extended with the truncated rows' indices)."""
        the_plan = plan(names)
        raw: dict[str, np.ndarray] = {}
        if the_plan.shared:
            raw, _ = score_shared(the_plan, self.loaded.backbone, self.loaded.tokenizer, conversations, self.detectors,
                                  self.settings, truncated=truncated)
        if the_plan.members:
            raw.update(score_members(the_plan, self.loaded.backbone, self.loaded.tokenizer,
                                     self.spec["ensemble"]["members"], conversations, self.settings))
        if the_plan.judge:
            raw.update(score_judge(the_plan, self.judge, self.rubrics, conversations, self.settings.batch_size)[0])
        return {n: raw[n] for n in names}

    def score(self, conversations: Sequence[str]) -> list[dict]:
        """Per conversation: ``score`` (fused), ``detectors`` (raw scores), ``contributions``,
        ``flags`` (``score > threshold`` per FPR), ``latency_s`` (wall time / row),
        ``truncated`` (the conversation was longer than ``max_length``: its start was cut) and
        ``unscorable`` (null, or why the row has no score: an empty conversation is not run
        through the model at all and is flagged at every FPR)."""
        conversations = list(conversations)
        blank = score_non_blank(conversations, self.score, self.unscorable_row)
        if blank is not None:
            return blank
        t0 = time.perf_counter()
        truncated: list[int] = []
        names = self.fusion.detectors
        raw = self.raw_scores(conversations, names, truncated)
        cut = set(truncated)
        fused = np.asarray(self.fusion.apply(raw), dtype=np.float64)
        hit = first_non_finite({**raw, "fused": fused})
        if hit is not None:  # fail closed: NaN > threshold is False, i.e. a silent "not flagged"
            raise UnscorableRow(*hit)
        contrib = self.contributions(raw)
        per_row = (time.perf_counter() - t0) / len(conversations)
        out = []
        for i in range(len(conversations)):
            out.append({
                "score": float(fused[i]),
                "detectors": {n: float(v[i]) for n, v in raw.items()},
                "contributions": {n: float(v[i]) for n, v in contrib.items()},
                "flags": {k: bool(fused[i] > float(t)) for k, t in self.thresholds.items()},
                "latency_s": per_row,
                "truncated": i in cut,
                "unscorable": None,
            })
        return out


def score_non_blank(conversations: list[str], score, unscorable_row) -> list[dict] | None:
    """``[]`` for no conversation; with blank ones (never run through a model), ``score`` of the
    others with each blank row's ``unscorable_row(EMPTY_CONVERSATION)`` in its place (an
    :class:`UnscorableRow` names the input's row); None when every row has text."""
    if not conversations:
        return []
    empty = {i for i, c in enumerate(conversations) if is_blank(c)}
    if not empty:
        return None
    keep = [i for i in range(len(conversations)) if i not in empty]
    try:
        scored = iter(score([conversations[i] for i in keep]))
    except UnscorableRow as exc:  # its index counts the kept rows: name the input's row
        raise UnscorableRow(keep[exc.index], exc.detector, exc.value, exc.n_rows) from None
    return [unscorable_row(EMPTY_CONVERSATION) if i in empty else next(scored) for i in range(len(conversations))]


class UnscorableRow(DataError):
    """A conversation whose score cannot be computed (``index`` into the scored list)."""

    def __init__(self, index: int, detector: str, value: float, n_rows: int = 1):
        self.index, self.detector, self.value, self.n_rows = index, detector, value, n_rows
        why = unscorable_reason(detector)
        super().__init__(f"conversation {index + 1}: field 'conversation': detector '{detector}' score is {value} "
                         f"({why}; {n_rows} such rows)")


def _load_judge(folder: Path, spec: dict, backbone, base: str | None, remote: bool = False):
    """The bundle's judge: the guard's base (``judge.model`` null) or its own base, plus the
    judge LoRA, tokenizer, rubrics and few-shot examples stored in the bundle."""
    from train.modeling import load_tokenizer, resolve_model

    from train.judge_prompts import load_rubric

    from ..engine.forward import SharedBackbone, adapter_hash
    from ..engine.judge_pass import Judge

    js, jdir = spec["judge"], folder / "judge"
    for key in ("model", "adapter", "max_length", "rubrics", "shots"):
        if key not in js:
            raise BundleError(f"{folder / 'monitor.json'}: field 'judge.{key}': missing")
    jb = backbone
    if js["model"] is not None:  # its own base, where the guard's went
        jb = SharedBackbone.from_pretrained(resolve_model(js["model"]), placement=backbone.placement,
                                            trust_remote_code=remote)
    adapter_dir = jdir / "adapter" if js["adapter"] else None
    if adapter_dir is not None:
        jb.add_adapter("judge", adapter_dir)
    rubrics = {n: load_rubric(jdir / "rubrics" / f"{n}.yaml", n) for n in js["rubrics"]}
    judge = Judge(jb, "judge" if adapter_dir is not None else None, load_tokenizer(jdir / "tokenizer"),
                  str(js["model"] or base or spec["base"]), adapter_dir,
                  None if adapter_dir is None else adapter_hash(adapter_dir), list(js["shots"]), int(js["max_length"]))
    return judge, rubrics


__all__ = ["MARKER", "Monitor", "check_export_out", "export_bundle", "own_bundle_files", "sha256_file", "staged_bundle", "verify_manifest",
           "write_manifest"]
