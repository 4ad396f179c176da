"""``moodguard refresh``: keep a deployed monitor current on new data, behind a gate, with a
lineage (issue 24; docs/refresh.md). :func:`refresh` is the library call, the CLI a thin layer.

Stages, each finished one recorded in ``<out>/refresh.json`` (written atomically after the
stage's outputs), so that a refresh killed at any point (kill -9 included) continues where it
stopped when run again with the same arguments, and a finished one only reports again:

1. ``parent``: the deployed bundle (``--from``), verified while copied into ``<out>/parent/``
   (only that copy is read afterwards; the bundle itself is never written); a run folder is
   exported there first (``moodguard export``);
2. ``data``: old and new rows, de-duplicated and split (:mod:`eval.run.refresh_data`);
3. ``drift``: the deployed monitor on its ID-safe calibration rows and on the new rows
   (:mod:`eval.run.drift`, ``<out>/drift.json``), before any training;
4. ``guard`` and ``lm``: the update, in one of the modes

   * ``continue`` -- warm start from the deployed adapters (``<kind>.init_adapter``), trained on
     old train + new train (``--replay all``, the default) or on new train + a seeded sample of
     N old train rows (``--replay N``); an LM adapter with no new safe train rows is kept;
   * ``retrain`` -- fresh adapters from the base model on old train + new train;
   * ``stats`` -- adapters kept; only the fitted statistics and the fusion are updated;

5. ``stats`` (mode ``stats``): Mahalanobis updated from the parent's sufficient statistics plus
   the new safe train rows (exact; one guard pass over the new rows, none over the old ones);
   in the other modes the guard's features changed, so the statistics are refitted on old +
   new train rows in the next stage;
6. ``candidate``: the refreshed monitor exported to ``<out>/candidate/`` (statistics on old + new
   train, fusion on the ID rows of old + new validation, thresholds on old + new test);
7. ``gate``: old and candidate bundles on the same rows (:mod:`eval.run.gate`, ``<out>/gate.json``);
8. ``promote``: when the gate passes, ``<out>/bundle/``: the candidate with the gate's figures in
   its lineage and card; ``<out>/report.md`` either way.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mood_data import atomic
from mood_data.errors import BundleError, DataError, MoodguardError, OutputError
from mood_data.readers import read_json, sha256_file

from .lineage import LINEAGE, check_lineage

MODES = ("continue", "retrain", "stats")
STAGES = ("parent", "data", "drift", "guard", "lm", "stats", "candidate", "gate", "promote")
LEDGER = "refresh.json"
LEDGER_FORMAT = 1
EXIT_HELD_BACK = 3
# continue mode's default: the new train rows plus five times as many old train rows (measured against
# old + new on the worked example: docs/refresh.md#continue-or-retrain-replay-or-not)
DEFAULT_REPLAY = "5x"
# keys the refresh sets itself (an override of one is refused: it would be silently replaced)
FORCED = ("output_dir", "data.source", "data.registry", "data.max_train_rows", "data.max_test_unsafe_per_domain",
          "data.max_test_safe_per_domain", "guard.init_adapter", "lm.init_adapter", "eval.monitors")


@dataclass(frozen=True)
class RefreshRequest:
    """What ``moodguard refresh`` was asked (``--from``, ``--data``, ``--out``, ...)."""

    source: str
    data: str
    out: str
    mode: str = "continue"
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    domains: str | None = None
    replay: str | None = None  # "all" (old + new train), N or Kx old train rows replayed with the new ones;
    # None: the mode's default (continue: DEFAULT_REPLAY; retrain / stats: all)
    test_fraction: float = 0.2
    fpr: float = 0.01
    id_margin: float = 0.05
    n_boot: int = 1000
    monitor: str | None = None  # which monitor of a run folder (--from RUN); a bundle has one
    device: str | None = None
    trust_remote_code: bool = False


@dataclass
class RefreshResult:
    promoted: bool
    reason: str
    out: Path
    bundle: Path | None
    gate: dict = field(default_factory=dict)
    drift: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.promoted else EXIT_HELD_BACK


def say(message: str) -> None:
    print(f"refresh: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- checks
def resolved(req: RefreshRequest) -> RefreshRequest:
    """``req`` with the mode's default replay filled in."""
    import dataclasses

    if req.replay is not None:
        return req
    return dataclasses.replace(req, replay=DEFAULT_REPLAY if req.mode == "continue" else "all")


def check_request(req: RefreshRequest) -> None:
    """Every value of the request, in one line each, before anything is read or written."""
    if req.mode not in MODES:
        raise MoodguardError(f"--mode {req.mode!r}: expected one of {', '.join(MODES)}")
    req = resolved(req)
    if req.replay != "all":
        if replay_count(req.replay, 1) is None:
            raise MoodguardError(f"--replay {req.replay!r}: expected 'all', a number of old train rows >= 0, or Kx "
                                 "(K times the new train rows, e.g. 2x)")
        if req.mode != "continue":
            raise MoodguardError(f"--replay {req.replay}: replay is a continue-mode choice (--mode {req.mode} trains "
                                 "on every old train row)" if req.mode == "retrain" else
                                 f"--replay {req.replay}: --mode stats trains nothing")
    for name, value, lo, hi in (("--test-fraction", req.test_fraction, 0.0, 1.0), ("--fpr", req.fpr, 0.0, 1.0)):
        if not lo < value < hi:
            raise MoodguardError(f"{name} {value}: must be in ({lo:g}, {hi:g})")
    if not 0.0 <= req.id_margin <= 1.0:
        raise MoodguardError(f"--id-margin {req.id_margin}: must be in [0, 1]")
    if req.n_boot < 1:
        raise MoodguardError(f"--n-boot {req.n_boot}: the gate needs bootstrap intervals (>= 1)")
    for ov in req.overrides:
        key = ov.partition("=")[0].strip()
        if key in FORCED:
            raise MoodguardError(f"override {ov!r}: {key} is set by the refresh itself (see docs/refresh.md)")
    src, out = Path(req.source).absolute(), Path(req.out).absolute()
    if not src.exists():
        raise BundleError(f"{req.source}: --from: not found")
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"{req.out}: --out must be a new folder beside --from {req.source}, not inside it or "
                          "holding it (the deployed bundle is never written)")
    if not Path(req.data).exists():
        raise DataError(f"{req.data}: --data: file not found")
    if req.recipe is not None and not Path(req.recipe).is_file():
        raise MoodguardError(f"{req.recipe}: --recipe: file not found")


def replay_count(replay: str, n_new_train: int) -> int | None:
    """The old train rows replayed: ``N`` or ``Kx`` (K times the new train rows, rounded); None if
    ``replay`` is neither (``all`` is handled by the caller)."""
    text = str(replay).strip()
    try:
        if text.endswith("x"):
            k = float(text[:-1])
            return round(k * n_new_train) if k >= 0 and k == k and k != float("inf") else None
        return int(text) if text.isdigit() else None
    except ValueError:
        return None


def source_kind(path: Path) -> str:
    if (path / "monitor.json").is_file() or (path / "manifest.json").is_file():
        return "bundle"
    if (path / "guard" / "adapter_config.json").is_file() and (path / "recipe.yaml").is_file():
        return "run"
    raise BundleError(f"{path}: --from: neither a monitor bundle (manifest.json) nor a run folder (guard/, recipe.yaml)")


def request_record(req: RefreshRequest) -> dict:
    """What identifies a refresh (``refresh.json: request``): the inputs' digests and every option."""
    from .refresh_data import file_sha256

    src = Path(req.source)
    if source_kind(src) == "bundle":
        ident = sha256_file(src / "manifest.json") if (src / "manifest.json").is_file() else None
    else:
        ident = file_sha256(src / "guard")
    doc = {k: v for k, v in asdict(req).items() if k not in ("out", "device")}
    doc.update(source=str(src.absolute()), source_sha256=ident, data=str(Path(req.data).absolute()),
               data_sha256=file_sha256(req.data), overrides=list(req.overrides),
               recipe=None if req.recipe is None else str(Path(req.recipe).absolute()),
               recipe_sha256=None if req.recipe is None else sha256_file(req.recipe),
               domains_sha256=None if req.domains is None else sha256_file(req.domains))
    return doc


# ----------------------------------------------------------------------------- the ledger
class Ledger:
    """``<out>/refresh.json``: the request and each finished stage's record (atomic writes)."""

    def __init__(self, out: Path, request: dict):
        self.out, self.path = out, out / LEDGER
        if self.path.is_file():
            doc = read_json(self.path, OutputError)
            if doc.get("moodguard_refresh") != LEDGER_FORMAT:
                raise OutputError(f"{self.path}: not a moodguard refresh record")
            old = doc.get("request") or {}
            for key in sorted(set(old) | set(request)):
                if old.get(key) != request.get(key):
                    raise OutputError(f"{out}: holds a refresh of other inputs (field '{key}': "
                                      f"{json.dumps(old.get(key))[:80]} there, {json.dumps(request.get(key))[:80]} now): "
                                      "choose another --out, or rerun with the same arguments to continue it")
            self.doc = doc
        else:
            entries = [p.name for p in out.iterdir()] if out.is_dir() else []
            if entries:
                raise OutputError(f"{out}: --out exists and is not a refresh folder ({len(entries)} entries, e.g. "
                                  f"{sorted(entries)[0]!r}): refused (nothing there is touched; choose a new folder)")
            self.doc = {"moodguard_refresh": LEDGER_FORMAT, "request": request, "stages": {}}
            self.save()

    def save(self) -> None:
        atomic.write_json(self.path, self.doc)

    def done(self, stage: str) -> dict | None:
        return self.doc["stages"].get(stage)

    def finish(self, stage: str, record: dict, seconds: float) -> dict:
        self.doc["stages"][stage] = {**record, "seconds": round(seconds, 3)}
        self.save()
        return self.doc["stages"][stage]


# ----------------------------------------------------------------------------- helpers
def _copy_tree(src: Path, dst: Path) -> None:
    """``src`` copied as ``dst`` (a folder built aside, then swapped in)."""
    with atomic.atomic_dir(dst) as tmp:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            else:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / rel)


def _copy_adapter(parent: Path, kind: str, dst: Path) -> None:
    """The parent's ``kind`` adapter as a run's adapter folder (with the bundle's tokenizer)."""
    from .bundle import ADAPTER_FILES

    with atomic.atomic_dir(dst) as tmp:
        for f in ADAPTER_FILES:
            shutil.copy2(parent / kind / f, tmp / f)
        for f in sorted((parent / "tokenizer").iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)


def _quote(value: Any) -> str:
    return "null" if value is None else json.dumps(str(value))


def parent_lineage(parent: Path, monitor: str) -> dict:
    """The parent's lineage; a bundle exported before lineages existed reads as a root of unknown data."""
    path = parent / LINEAGE
    if not path.is_file():
        return {"mode": "export", "monitor": monitor, "ancestors": [], "data": {}}
    return check_lineage(read_json(path, BundleError), path)


def _rows(path: Path, registry, split: str = "train"):
    """The rows of a file the data stage wrote (None when it holds none, e.g. no new validation row)."""
    from mood_data.load import load_split_file

    if path.stat().st_size == 0:
        return None
    return load_split_file(path, split, registry=registry)


# ----------------------------------------------------------------------------- stages
class Refresh:
    """One refresh: the request, its folder and the stages (module docstring)."""

    def __init__(self, req: RefreshRequest, ledger: Ledger):
        self.req, self.ledger = req, ledger
        self.out = Path(req.out)
        self.parent = self.out / "parent"
        self.data = self.out / "data"
        self.run_root = self.out / "run"

    # -- the stage runner
    def stage(self, name: str, body) -> dict:
        rec = self.ledger.done(name)
        if rec is not None:
            return rec
        say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}")
        t0 = time.perf_counter()
        return self.ledger.finish(name, body() or {}, time.perf_counter() - t0)

    # -- 1. parent
    def copy_parent(self) -> dict:
        from .bundle_check import staged_bundle

        src = Path(self.req.source)
        if source_kind(src) == "bundle":
            with staged_bundle(src) as (staged, _):  # verified while copied: only these bytes are used
                _copy_tree(staged, self.parent)
            how = "copied (verified)"
        else:
            self._export_run(src)
            how = "exported from the run"
        spec = read_json(self.parent / "monitor.json", BundleError)
        return {"how": how, "sha256": sha256_file(self.parent / "manifest.json"), "monitor": spec["monitor"]}

    def _export_run(self, run: Path) -> None:
        from train.recipe import load_recipe

        from .bundle import export
        from .context import resolve

        recipe = load_recipe(run / "recipe.yaml", [f"output_dir={_quote(run.absolute())}"],
                             trust_remote_code=self.req.trust_remote_code)
        monitor = self.req.monitor or "guard+maha+ppl"
        ctx = resolve(recipe, [monitor], device=self.req.device)
        name = next(iter(ctx.monitors))
        if not (run / "eval" / name / "analysis.json").is_file():
            raise BundleError(f"{run / 'eval' / name / 'analysis.json'}: not found: evaluate the run's monitor first "
                              f"(moodguard evaluate --recipe {run / 'recipe.yaml'} --monitors {name}); a refresh does "
                              "not write into the run")
        export(ctx, self.parent)

    def verify_parent(self, rec: dict) -> dict:
        """The copy is the one the earlier stages used (a resumed refresh re-reads it)."""
        if sha256_file(self.parent / "manifest.json") != rec["sha256"]:
            raise OutputError(f"{self.parent}: changed since the parent stage (manifest sha256 differs); start over "
                              "with a new --out")
        return read_json(self.parent / "monitor.json", BundleError)

    # -- recipes
    def base_recipe(self) -> Path:
        return Path(self.req.recipe) if self.req.recipe else self.parent / "recipe.yaml"

    def overrides(self, source: Path, registry: str | None, spec: dict, mode: str) -> list[str]:
        cont = mode == "continue"
        forced = [f"output_dir={_quote(self.run_root.absolute())}", f"data.source={_quote(source.absolute())}",
                  f"data.registry={_quote(registry)}", "data.max_train_rows=null",
                  "data.max_test_unsafe_per_domain=null", "data.max_test_safe_per_domain=null",  # test.jsonl is final
                  f"guard.init_adapter={_quote((self.parent / 'guard').absolute()) if cont else 'null'}",
                  f"lm.init_adapter={_quote((self.parent / 'lm').absolute()) if cont else 'null'}",
                  "eval.monitors=" + json.dumps([spec["monitor"]])]
        if not cont or not (self.parent / "lm").is_dir():
            forced = [f for f in forced if not f.startswith("lm.init_adapter=")] + ["lm.init_adapter=null"]
        if cont:
            forced.append("guard.init_head=random")  # the warm-started head is kept
        return [*self.req.overrides, *forced]

    def plain_recipe(self, path: Path):
        """A recipe read for its values only: the warm-start folders it may name (a refreshed
        bundle's recipe names its own refresh's parent/) are not needed, nor checked."""
        from train.recipe import load_recipe

        return load_recipe(path, ["guard.init_adapter=null", "lm.init_adapter=null"],
                           trust_remote_code=self.req.trust_remote_code)

    def load_recipe(self, source: Path, registry: str | None, spec: dict):
        """The refresh's recipe (``--recipe`` or the parent's) with its overrides and the forced
        keys; its base model must be the parent's (a refresh keeps the base)."""
        from train.recipe import load_recipe

        overrides = self.overrides(source, registry, spec, self.req.mode)
        recipe = load_recipe(self.base_recipe(), overrides, trust_remote_code=self.req.trust_remote_code)
        if str(recipe.model) != str(spec["base"]):
            raise MoodguardError(f"{self.base_recipe()}: key 'model': {recipe.model!r} but the deployed monitor's base "
                                 f"is {spec['base']!r} (a refresh keeps the base model)")
        return recipe, overrides

    # -- 2. data
    def prepare_data(self, spec: dict, plineage: dict) -> dict:
        from mood_data.domains import load_registry
        from mood_data.load import cap_groups
        from mood_data.sources import check_source

        from . import refresh_data as rd
        from .lineage import data_record

        parent_recipe = self.plain_recipe(self.parent / "recipe.yaml")
        d = parent_recipe.data
        try:
            check_source(d.source)
        except DataError as exc:
            raise DataError(f"{exc} (the parent's data.source, in {self.parent / 'recipe.yaml'}: a refresh needs the "
                            "parent's old train and test rows)") from None
        reg_path = rd.merge_registries([d.registry, self.req.domains], self.data / "domains.yaml")
        registry = load_registry(reg_path)
        parent_reg = load_registry(d.registry)
        old = rd.load_old(d.source, template=d.template, registry=d.registry, fraction=d.validation_fraction,
                          max_rows=d.max_train_rows, groups=d.validation_groups)
        records = {"old_train": data_record(old.train), "old_validation": data_record(old.validation)}
        for key, mine in (("train", "old_train"), ("validation", "old_validation")):
            known = (plineage.get("data") or {}).get(key)
            if known is not None and known != records[mine]:
                raise DataError(f"{d.source}: the parent's {key} rows changed since it was fitted on them (its lineage "
                                f"records {known['rows']} rows, sha256 {known['sha256'][:16]}; the source now gives "
                                f"{records[mine]['rows']}, {records[mine]['sha256'][:16]})")
        plain = self.plain_recipe(self.base_recipe()).data
        raw = rd.read_new(self.req.data, registry, d.template)
        new = rd.split_new(raw, old, registry, test_fraction=self.req.test_fraction,
                           validation_fraction=plain.validation_fraction, label=self.req.data,
                           source=Path(self.req.data), groups=plain.validation_groups)
        new_domains = sorted(x for x in set(new.rows["domain"]) if x not in parent_reg.known)
        full = self.data / "full"
        # the old test rows the parent was evaluated on (its seeded caps, if any) + every new test row
        old_test = cap_groups(old.test, d.max_test_unsafe_per_domain, d.max_test_safe_per_domain)
        parts = {"train": rd.concat(old.train, new.train), "validation": rd.concat(old.validation, new.validation),
                 "test": rd.concat(old_test, new.test)}
        for split, ds in parts.items():
            rd.write_rows(full / f"{split}.jsonl", ds)
        for split in ("train", "validation", "test"):
            rd.write_rows(self.data / f"new-{split}.jsonl", getattr(new, split))
        calib = old.validation.filter(lambda b: [parent_reg.is_id(x) and int(m) == 0
                                                 for x, m in zip(b["domain"], b["malign"])], batched=True)
        rd.write_rows(self.data / "calibration.jsonl", calib)
        if self.req.replay != "all":
            replay = rd.replay_sample(old.train, replay_count(self.req.replay, len(new.train)))
            rd.write_rows(self.data / "replay" / "train.jsonl", rd.concat(new.train, replay))
            records["replay"] = data_record(replay)
        atomic.write_json(self.data / "dedup.json", new.report)
        records.update(old_test=data_record(old_test), new_rows=data_record(new.rows), new_train=data_record(new.train),
                       new_validation=data_record(new.validation), new_test=data_record(new.test),
                       train=data_record(parts["train"]), validation=data_record(parts["validation"]))
        dropped = {k: v["rows"] for k, v in new.report["dropped"].items() if v["rows"]}
        say(f"new rows: {new.report['n_read']} read, {new.report['n_kept']} kept"
            + (f" (dropped: {', '.join(f'{n} {k}' for k, n in dropped.items())})" if dropped else "")
            + f"; train {len(new.train)}, validation {len(new.validation)}, test {len(new.test)}; "
              f"new domains: {', '.join(new_domains) or 'none'}")
        n_new_safe = int(sum(1 for x, m in zip(new.train["domain"], new.train["malign"]) if int(m) == 0))
        return {"registry": None if reg_path is None else str(reg_path.absolute()),
                "parent_registry": d.registry, "old_source": str(d.source), "template": d.template,
                "new_domains": new_domains, "new_safe_train_rows": n_new_safe, "dedup": new.report, "data": records}

    # -- 3. drift
    def drift(self, spec: dict, data: dict) -> dict:
        from mood_data.domains import load_registry

        from . import refresh_data as rd
        from .bundle import Monitor
        from .drift import drift_report, format_drift

        registry = load_registry(data["registry"])
        calib = _rows(self.data / "calibration.jsonl", load_registry(data["parent_registry"]))
        if calib is None:
            raise DataError(f"{data['old_source']}: the parent's validation slice holds no ID-safe row: drift is "
                            "measured against them (nothing to compare with)")
        new = rd.concat(*(_rows(self.data / f"new-{s}.jsonl", registry, "test")
                          for s in ("train", "validation", "test")))
        mon = Monitor.load(self.parent, device=self.req.device, trust_remote_code=self.req.trust_remote_code)
        say(f"drift: the deployed monitor on {len(calib)} ID-safe calibration rows and {len(new)} new rows")
        c_rows = mon.score(list(calib["conversation"]))
        n_rows = mon.score(list(new["conversation"]))
        report = drift_report(c_rows, n_rows, list(new["domain"]), list(new["malign"]), list(mon.fusion.detectors),
                              mon.thresholds, data["new_domains"], mon.name)
        del mon
        atomic.write_json(self.out / "drift.json", report)
        text = format_drift(report, format(self.req.fpr, "g"))
        print(text, file=sys.stderr)
        return {"drifted": report["drifted"]}

    # -- 4. guard / lm
    def train(self, kind: str, spec: dict, data: dict) -> dict:
        from eval.engine.planner import plan
        from eval.engine.table import parse_monitor
        from train.launch import run_training

        mode = self.req.mode
        if kind == "lm" and not plan(parse_monitor(spec["monitor"])).needs_lm_adapter:
            return {"how": "none (the monitor reads no causal-LM adapter)"}
        keep = mode == "stats" or (kind == "lm" and mode == "continue" and data["new_safe_train_rows"] == 0)
        if keep:
            _copy_adapter(self.parent, kind, self.run_root / kind)
            why = "--mode stats" if mode == "stats" else "no new safe train rows"
            say(f"{kind}: the deployed adapter is kept ({why})")
            return {"how": f"kept ({why})"}
        source = self.data / ("replay" if self.req.replay != "all" else "full")
        recipe, overrides = self.load_recipe(source, data["registry"], spec)
        rc = run_training(kind, recipe, self.base_recipe(), overrides, resume=True)
        if rc != 0:
            raise MoodguardError(f"{kind} training stopped (exit status {rc}); rerun the same command to continue")
        how = {"continue": "continued from the deployed adapter", "retrain": "retrained from the base model"}[mode]
        steps = recipe.section(kind).max_steps
        replayed = (data["data"].get("replay") or {}).get("rows")
        return {"how": how, "steps": steps, "rows": "old + new train" if self.req.replay == "all" else
                f"new train + {replayed} replayed old train rows (--replay {self.req.replay})"}

    # -- 5. stats (mode stats)
    def update_stats(self, spec: dict, data: dict) -> dict:
        from eval.engine.table import DETECTORS, fitted
        from mood_data.domains import load_registry

        from .backbone import load_run
        from .fitting import load_stats, update_feature_detectors

        if self.req.mode != "stats":
            return {"how": "refitted on old + new train rows in the candidate stage (the guard's features changed)"}
        ctx = self.context(spec, data)
        s = spec["settings"]
        for key, mine in (("max_length", ctx.score.max_length), ("pooling", ctx.score.pooling)):
            if s[key] != mine:
                raise MoodguardError(f"{self.parent / 'monitor.json'}: field 'settings.{key}': {s[key]!r} but the "
                                     f"refresh recipe gives {mine!r} (--mode stats reads the same features)")
        # the fitted detectors that can take new rows from stored sufficient statistics (the others,
        # e.g. kNN's reference rows, are refitted by the candidate stage as in the other modes)
        kinds = [k for k in fitted(ctx.needed) if callable(getattr(DETECTORS[k], "updated", None))]
        dets = {k: {int(layer): load_stats(self.parent / "stats", k, f"{k}-layer{layer}") for layer in spec["stats"][k]}
                for k in kinds}
        for k, per in dets.items():
            if sorted(per) != sorted(ctx.layers):
                raise MoodguardError(f"{self.parent / 'monitor.json'}: field 'stats.{k}': layers {sorted(per)} but the "
                                     f"refresh recipe reads {sorted(ctx.layers)}")
            for layer, det in per.items():
                if det.settings != ctx.detector_settings[k]:
                    raise MoodguardError(f"{self.parent / 'stats' / f'{k}-layer{layer}.json'}: settings {det.settings} "
                                         f"differ from the refresh recipe's {ctx.detector_settings[k]}")
                if not det.updatable:
                    raise BundleError(f"{self.parent / 'stats' / f'{k}-layer{layer}.safetensors'}: no sufficient "
                                      "statistics (exported before they were stored): --mode stats cannot update it; "
                                      "use --mode continue or retrain")
        registry = load_registry(data["registry"])
        train = _rows(self.data / "full" / "train.jsonl", registry)
        new_train = _rows(self.data / "new-train.jsonl", registry)
        done = update_feature_detectors(ctx, load_run(ctx.model), dets, train, new_train)
        say(f"stats: {', '.join(done) or 'nothing'} updated from the sufficient statistics + {len(new_train)} new "
            "train rows (no pass over the old rows)")
        return {"how": "updated from the parent's sufficient statistics", "updated": done, "new_rows": len(new_train)}

    def context(self, spec: dict, data: dict):
        from .context import resolve

        recipe, _ = self.load_recipe(self.data / "full", data["registry"], spec)
        return resolve(recipe, [spec["monitor"]], predict_safe=bool(spec["settings"]["predict_safe"]),
                       device=self.req.device)

    # -- 6. candidate
    def candidate(self, spec: dict, data: dict, plineage: dict, parent_rec: dict, trained: dict) -> dict:
        from mood_data.domains import load_registry

        from .bundle import export
        from .lineage import child_lineage

        ctx = self.context(spec, data)
        registry = load_registry(data["registry"])
        cut = (_rows(self.data / "full" / "train.jsonl", registry), _rows(self.data / "full" / "validation.jsonl", registry))
        if (self.run_root / "eval").exists():  # a killed attempt's evaluation (this refresh's own): redone
            shutil.rmtree(self.run_root / "eval")
        keys = ("train", "validation", "new_rows", "new_train", "new_validation", "new_test", "old_train", "old_test",
                "replay")
        lineage = child_lineage(plineage, parent_rec["sha256"], self.req.source, monitor=spec["monitor"],
                                mode=self.req.mode, data={k: data["data"][k] for k in keys if k in data["data"]},
                                training={"replay": self.req.replay, **{k: trained[k]["how"] for k in trained}})
        export(ctx, self.out / "candidate", cut=cut, lineage=lineage)
        return {"sha256": sha256_file(self.out / "candidate" / "manifest.json")}

    # -- 7. gate
    def gate(self, spec: dict, data: dict, parent_rec: dict, cand_rec: dict) -> dict:
        from mood_data.domains import load_registry

        from .bundle import Monitor
        from .gate import run_gate

        if sha256_file(self.out / "candidate" / "manifest.json") != cand_rec["sha256"]:
            raise OutputError(f"{self.out / 'candidate'}: changed since it was exported; start over with a new --out")
        test = _rows(self.data / "full" / "test.jsonl", load_registry(data["registry"]), "test")
        convs = list(test["conversation"])
        scores = {}
        for side, folder in (("old", self.parent), ("new", self.out / "candidate")):
            mon = Monitor.load(folder, device=self.req.device, trust_remote_code=self.req.trust_remote_code)
            say(f"gate: the {side} monitor on {len(convs)} test rows")
            scores[side] = [r["score"] for r in mon.score(convs)]
            del mon
        gate = run_gate(list(test["id"]), list(test["domain"]), list(test["malign"]), scores["old"], scores["new"],
                        parent=load_registry(data["parent_registry"]), new_domains=data["new_domains"], fpr=self.req.fpr,
                        id_margin=self.req.id_margin, n_boot=self.req.n_boot, monitor=spec["monitor"])
        gate.update(old_bundle=parent_rec["sha256"], candidate=cand_rec["sha256"], n_rows=len(convs))
        atomic.write_json(self.out / "gate.json", gate)
        print(gate["table"], file=sys.stderr)
        return {"decision": gate["decision"], "reason": gate["reason"]}

    # -- 8. promote
    def promote(self, spec: dict, gate_rec: dict) -> dict:
        if gate_rec["decision"] != "promoted":
            return {"bundle": None}
        promote_bundle(self.out / "candidate", self.out / "bundle", read_json(self.out / "gate.json"),
                       self.run_root / "eval" / spec["monitor"], self.run_root / "guard")
        return {"bundle": str(self.out / "bundle"), "sha256": sha256_file(self.out / "bundle" / "manifest.json")}


def promote_bundle(candidate: Path, out: Path, gate: dict, eval_dir: Path, guard_dir: Path) -> Path:
    """``out``: the candidate's files with the gate's figures in its lineage and card, and a new
    manifest. Every other file is the candidate's, byte for byte (the monitor the gate measured),
    read through the verified copy."""
    from mood_data.readers import read_yaml

    from .bundle import MANIFEST, MARKER, write_manifest
    from .bundle_check import staged_bundle
    from .gate import gate_summary
    from .hub import bundle_card

    own = {MANIFEST, LINEAGE, "README.md", MARKER}
    with staged_bundle(candidate) as (staged, manifest):
        lineage = read_json(staged / LINEAGE, BundleError)
        lineage["gate"] = gate_summary(gate)
        check_lineage(lineage, candidate / LINEAGE)
        spec = read_json(staged / "monitor.json", BundleError)
        recipe_doc = read_yaml(staged / "recipe.yaml", BundleError) or {}
        metrics = read_json(guard_dir / "metrics.json") if (guard_dir / "metrics.json").is_file() else {}
        card = bundle_card(out, dict(recipe_doc), read_json(eval_dir / "analysis.json"), spec["monitor"],
                           read_json(eval_dir / "meta.json"), metrics, lineage=lineage)
        with atomic.atomic_dir(out) as tmp:
            for rel in sorted(manifest["files"]):
                if rel not in own:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(staged / rel, tmp / rel)
            atomic.write_json(tmp / LINEAGE, lineage)
            atomic.write_text(tmp / "README.md", str(card))
            atomic.write_json(tmp / MARKER, {"moodguard_bundle": 1})
            done = read_json(write_manifest(tmp))
            same = {k: v for k, v in done["files"].items() if k not in own}
            if same != {k: v for k, v in manifest["files"].items() if k not in own}:
                raise BundleError(f"{out}: the promoted files differ from the candidate's (not written)")
    return out


def refresh(req: RefreshRequest) -> RefreshResult:
    """Run (or continue) the refresh ``req`` (module docstring); the result says whether the
    candidate was promoted (``exit_code`` 0) or held back (3) and why."""
    from eval.engine.planner import plan
    from eval.engine.table import parse_monitor
    from mood_data.runlock import output_lock

    check_request(req)
    req = resolved(req)
    out = Path(req.out)
    if out.is_symlink():
        raise OutputError(f"{out}: --out is a symlink (refused: a refresh writes only into a folder of its own)")
    source_kind(Path(req.source))
    record = request_record(req)
    with output_lock(out, "--out"):
        run = Refresh(req, Ledger(out, record))
        parent_rec = run.stage("parent", run.copy_parent)
        spec = run.verify_parent(parent_rec)
        names = parse_monitor(spec["monitor"])
        p = plan(names)
        if p.members or p.judge:
            raise MoodguardError(f"{run.parent / 'monitor.json'}: field 'monitor': {spec['monitor']}: refresh updates "
                                 "guard / fitted / perplexity monitors; ensemble and judge monitors are not supported yet")
        plineage = parent_lineage(run.parent, spec["monitor"])
        data = run.stage("data", lambda: run.prepare_data(spec, plineage))
        run.stage("drift", lambda: run.drift(spec, data))
        trained = {k: run.stage(k, lambda k=k: run.train(k, spec, data)) for k in ("guard", "lm")}
        run.stage("stats", lambda: run.update_stats(spec, data))
        cand = run.stage("candidate", lambda: run.candidate(spec, data, plineage, parent_rec, trained))
        gate_rec = run.stage("gate", lambda: run.gate(spec, data, parent_rec, cand))
        prom = run.stage("promote", lambda: run.promote(spec, gate_rec))
        write_report(run, data, trained)
    promoted = gate_rec["decision"] == "promoted"
    return RefreshResult(promoted, gate_rec["reason"], out, Path(prom["bundle"]) if prom.get("bundle") else None,
                         read_json(out / "gate.json"), read_json(out / "drift.json"))


def write_report(run: Refresh, data: dict, trained: dict) -> Path:
    """``<out>/report.md``: the data, the drift, the update, the gate and the decision."""
    from .drift import format_drift

    out, req = run.out, run.req
    stages = run.ledger.doc["stages"]
    drift, gate = read_json(out / "drift.json"), read_json(out / "gate.json")
    rep = data["dedup"]
    dropped = ", ".join(f"{v['rows']} {k}" for k, v in rep["dropped"].items() if v["rows"]) or "none"
    lines = [f"# Refresh of {stages['parent']['monitor']}", "",
             f"- From: `{req.source}` (manifest sha256 `{stages['parent']['sha256'][:16]}`, {stages['parent']['how']})",
             f"- New rows: `{req.data}`: {rep['n_read']} read, {rep['n_kept']} kept (dropped: {dropped}); "
             f"train {rep['n_train']}, validation {rep['n_validation']}, test {rep['n_test']}; new domains: "
             f"{', '.join(data['new_domains']) or 'none'}",
             f"- Mode: `{req.mode}`" + (f", replay `{req.replay}`" if req.mode == "continue" else ""), "",
             "## Drift (before any training)", "", format_drift(drift, format(req.fpr, "g")),
             "## Update", "", "| stage | what | seconds |", "|---|---|---:|"]
    for name in STAGES:
        rec = stages.get(name) or {}
        what = rec.get("how") or rec.get("decision") or ("written" if rec else "")
        lines.append(f"| {name} | {what} | {rec.get('seconds', 0):.1f} |")
    lines += ["", f"## Gate (FPR {gate['fpr']:g}, {gate['n_negatives']} negatives, {gate['n_rows']} test rows, "
              f"{gate['n_boot']} paired bootstrap resamples)", "", gate["table"], "",
              "| check | group | rule | passed |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['group']} | {c['rule']} | {'yes' if c['passed'] else 'NO'} |" for c in gate["checks"]]
    bundle = (stages.get("promote") or {}).get("bundle")
    lines += ["", f"**{gate['reason']}**", "",
              f"Promoted bundle: `{bundle}`" if bundle else
              f"No bundle promoted; the candidate stays in `{out / 'candidate'}` for inspection."]
    return atomic.write_text(out / "report.md", "\n".join(lines) + "\n")


__all__ = ["EXIT_HELD_BACK", "MODES", "RefreshRequest", "RefreshResult", "check_request", "promote_bundle", "refresh"]
