"""Guard training ablation on the embedded benchmark's ID task (issue 21): does the guard beat
TF-IDF and a probe on its own frozen features, and which training lever closes the gap?

    python benchmarks/guard_ablation.py --recipe recipes/tiny/m.yaml --settings today,head_lr,lpft,lpft_epochs
    python benchmarks/guard_ablation.py --recipe recipes/smollm2/135m.yaml --settings ... --json out.json
    python benchmarks/guard_ablation.py --recipe R --baselines-only      # TF-IDF + frozen probe only
    python benchmarks/guard_ablation.py --recipe R --baselines-only --cheap-baselines   # TF-IDF only, seconds

Every setting trains the guard LoRA from the recipe with its overrides (``SETTINGS``), then scores
EVERY ID row of the test split through the evaluation path (``eval.forward.SharedBackbone``,
last-token pooling, left padding) and reports, on those rows: pooled ID AUROC, ID TPR at 1 % FPR
(threshold = 99th percentile of the ID-safe test scores, numpy linear, strictly above), AUROC per
ID domain with both classes and per labelled harm source, validation AUROC, train seconds. The
baselines are fitted on the guard's own train part (the train split minus its validation slice)
and scored on the same rows: TF-IDF (``mood_data.build.baseline.tfidf_scores``) on the whole
conversation and on the window the guard reads (the last ``eval.max_length`` tokens), and a logistic
probe (standardised, C 0.1) on the frozen base model's final hidden state at the last token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402  (offline environment, write_json)

HARM_TAGS = ("pyrit", "xstest", "rbr", "bfcl", "bfclmt")
# name: recipe overrides on top of --recipe (cumulative reading: each adds one lever)
SETTINGS: dict[str, list[str]] = {
    "today": [],
    "head_lr": ["guard.head_learning_rate=1.0e-2"],
    "lpft": ["guard.init_head=probe"],
    "lpft_c01": ["guard.init_head=probe", "guard.probe_c=0.1"],
    "lpft_head_lr": ["guard.init_head=probe", "guard.head_learning_rate=1.0e-3"],
    "epochs": ["guard.max_steps=-1", "guard.num_epochs=3", "guard.eval_every=epoch"],
    "lpft_epochs": ["guard.init_head=probe", "guard.max_steps=-1", "guard.num_epochs=3", "guard.eval_every=epoch"],
    "all_linear": ["guard.lora.r=16", "guard.lora.alpha=32",
                   "guard.lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"],
    "all_linear_lpft_epochs": ["guard.lora.r=16", "guard.lora.alpha=32",
                               "guard.lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                               "guard.init_head=probe", "guard.max_steps=-1", "guard.num_epochs=5", "guard.eval_every=epoch"],
    "embed": ["guard.lora.r=16", "guard.lora.alpha=32",
              "guard.lora.target_modules=[embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"],
    "embed_lr3e-3_epochs": ["guard.lora.r=16", "guard.lora.alpha=32",
                            "guard.lora.target_modules=[embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                            "guard.learning_rate=3.0e-3", "guard.max_steps=-1", "guard.num_epochs=3",
                            "guard.eval_every=epoch"],
    "linear_lpft_c01": ["guard.lora.r=16", "guard.lora.alpha=32",
                        "guard.lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                        "guard.init_head=probe", "guard.probe_c=0.1", "guard.learning_rate=5.0e-4",
                        "guard.eval_every=50"],
    "linear_lr5e-4": ["guard.lora.r=16", "guard.lora.alpha=32",
                      "guard.lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                      "guard.learning_rate=5.0e-4", "guard.eval_every=50"],
    "select50": ["guard.eval_every=50"],
    "select50_prompt": ["guard.eval_every=50", "data.validation_groups=prompt"],
    "seed1": ["guard.seeds=[1]"],
    "seed2": ["guard.seeds=[2]"],
    "full": ["guard.init_head=probe", "guard.head_learning_rate=1.0e-3", "guard.class_weights=balanced",
             "guard.max_steps=-1", "guard.num_epochs=3", "guard.eval_every=epoch"],
}


def id_rows(recipe) -> tuple[list[dict], list[dict], list[dict]]:
    """(train part, validation slice, ID test rows) exactly as training and evaluation cut them."""
    from mood_data.build.baseline import source_tag
    from mood_data.domains import ID_DOMAINS
    from mood_data.load import load_splits
    from train.data import train_validation_cut

    train, val = train_validation_cut(recipe)
    test = [dict(r) for r in load_splits(recipe.data.source, template=recipe.data.template)["test"]
            if r["domain"] in ID_DOMAINS]
    for r in test:
        r["tag"] = source_tag(r)
    return [dict(r) for r in train], [dict(r) for r in val], test


def summary(test: list[dict], scores) -> dict:
    from eval.engine.metrics import auroc, tpr_at_fpr

    s = np.asarray(scores, dtype=np.float64)
    y = np.array([r["malign"] for r in test])
    out = {"id_auroc": round(auroc(s[y == 0], s[y == 1]), 4),
           "id_tpr_at_1pct_fpr": round(tpr_at_fpr(s[y == 0], s[y == 1], 0.01), 4)}
    for key, field in (("domain", "domain"), ("source", "tag")):
        for v in sorted({r[field] for r in test}):
            m = np.array([r[field] == v for r in test])
            if len(set(y[m].tolist())) == 2 and (field == "domain" or v in HARM_TAGS):
                out[f"{key}:{v}"] = round(auroc(s[m & (y == 0)], s[m & (y == 1)]), 4)
    return out


def guard_test_scores(recipe, guard_dir: Path, test: list[dict]) -> np.ndarray:
    from eval.engine.detectors.logits import guard_scores
    from eval.engine.forward import encode, guard_pass
    from eval.run.backbone import load_backbone
    from eval.run.context import resolve

    loaded = load_backbone(resolve(recipe).model, guard_dir, None)
    enc = encode(loaded.tokenizer, [r["conversation"] for r in test], recipe.eval.max_length)
    logits = guard_pass(loaded.backbone, enc, batch_size=recipe.eval.batch_size, desc="guard on ID test rows")
    return guard_scores(logits)


def recipe_tokenizer(recipe):
    """The tokenizer the recipe's guard reads with (its ``tokenizer``, else the base model's)."""
    from train.modeling import load_tokenizer, resolve_model

    return load_tokenizer(recipe.tokenizer or resolve_model(recipe.model), trust_remote_code=recipe.trust_remote_code)


def frozen_features(recipe, rows: list[dict]) -> np.ndarray:
    import torch

    from eval.engine.forward import SharedBackbone, collate, encode, length_batches
    from train.device import placement
    from train.modeling import resolve_model

    tok = recipe_tokenizer(recipe)
    bb = SharedBackbone.from_pretrained(resolve_model(recipe.model), placement=placement(recipe.dtype, None))
    enc = encode(tok, [r["conversation"] for r in rows], recipe.eval.max_length)
    out = np.zeros((len(rows), bb.causal_lm.config.hidden_size))
    pad = tok.pad_token_id
    from tqdm.auto import tqdm

    with torch.no_grad():
        for index in tqdm(length_batches(enc.lengths, recipe.eval.batch_size), desc="frozen features"):
            b = collate(enc, index, pad)
            h = bb.lm_hidden(b["input_ids"].to(bb.device), b["attention_mask"].to(bb.device), adapter=None)
            out[index] = h[:, -1].double().cpu().numpy()
    return out


def window_rows(tok, rows: list[dict], max_length: int) -> list[dict]:
    """``rows`` with each conversation cut to the window the guard reads: the last ``max_length``
    tokens of ``tok``, decoded back to text."""
    from eval.engine.forward import encode

    enc = encode(tok, [r["conversation"] for r in rows], max_length)
    return [{**r, "conversation": tok.decode(list(ids), skip_special_tokens=True)} for r, ids in zip(rows, enc.input_ids)]


def cheap_baselines(recipe, train: list[dict], test: list[dict]) -> dict:
    """TF-IDF on the whole conversation and on the guard's window (seconds, no model forward)."""
    from mood_data.build.baseline import tfidf_scores

    tok, n = recipe_tokenizer(recipe), recipe.eval.max_length
    return {"tfidf": summary(test, tfidf_scores(train, test)),
            "tfidf_window": summary(test, tfidf_scores(window_rows(tok, train, n), window_rows(tok, test, n)))}


def baselines(recipe, train: list[dict], test: list[dict]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = cheap_baselines(recipe, train, test)
    t0 = time.perf_counter()
    xtr, xte = frozen_features(recipe, train), frozen_features(recipe, test)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    clf.fit(xtr, [r["malign"] for r in train])
    out["frozen_probe"] = {**summary(test, clf.decision_function(xte)), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def run_setting(recipe_path: Path, name: str, work: Path, test: list[dict], extra: list[str]) -> dict:
    from train.guard import train_guard
    from train.recipe import load_recipe

    overrides = SETTINGS[name] + extra + [f"output_dir={work / name}"]
    recipe = load_recipe(recipe_path, overrides)
    t0 = time.perf_counter()
    folder = train_guard(recipe)
    seconds = time.perf_counter() - t0
    metrics = json.loads((folder / "metrics.json").read_text())
    scores = guard_test_scores(recipe, folder, test)
    # per-row test scores beside the run, so a later analysis (by source, by truncation) needs no rescoring
    common.write_json(work / name / "test_scores.json", {"id": [r["id"] for r in test],
                                                          "score": [float(s) for s in scores]})
    res = {"overrides": SETTINGS[name] + extra, "train_seconds": round(seconds, 1),
           "validation_auroc": round(metrics["validation"].get("eval_auroc", float("nan")), 4),
           "steps": metrics["train"].get("global_step", metrics.get("global_step")),
           **summary(test, scores)}
    for k in ("best_step", "best_validation_auroc", "probe_train_auroc"):
        if k in metrics:
            res[k] = metrics[k]
    return res


def main(argv=None) -> int:
    from train.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--settings", default="today,head_lr,lpft,lpft_epochs")
    ap.add_argument("--override", action="append", default=[], help="extra recipe override for every setting")
    ap.add_argument("--baselines-only", action="store_true")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--cheap-baselines", action="store_true",
                    help="TF-IDF (whole conversation and the guard's window) only, no frozen-feature probe")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moodguard-ablation"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default; 1 on a busy CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.override)
    train, _, test = id_rows(recipe)
    res: dict = {"recipe": str(args.recipe), "n_test_id": len(test), "n_train": len(train), "settings": {}}
    if not args.no_baselines:
        res["baselines"] = (cheap_baselines if args.cheap_baselines else baselines)(recipe, train, test)
        print(json.dumps(res["baselines"]), flush=True)
    if not args.baselines_only:
        for name in args.settings.split(","):
            res["settings"][name] = run_setting(args.recipe, name, args.work, test, args.override)
            print(name, json.dumps(res["settings"][name]), flush=True)
            common.write_json(args.json, res)  # after each setting: a long run keeps what it measured
    print(json.dumps(res, indent=1))
    common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
