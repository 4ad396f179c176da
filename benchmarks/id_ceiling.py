"""Why the guards do not learn ID: label quality of the ID unsafe rows, and what simple models,
frozen-feature probes and guard settings reach on the embedded ID data.

    python benchmarks/id_ceiling.py labels                 # label audit (no model, seconds)
    python benchmarks/id_ceiling.py baselines              # TF-IDF / format-only LR (seconds)
    python benchmarks/id_ceiling.py probe [--sizes xxs,s,m,l] [--max-length 256]   # minutes
    python benchmarks/id_ceiling.py guards [--size m] [--settings NAME,...]        # minutes each
    ... --json out.json  writes the figures

Data: the embedded benchmark. "validation" is the guard's own ID validation slice (the train
split cut by ``train.data.train_validation_split`` with the base recipe's fraction, seed 0);
models that need training (LR, probes) train on the rest of the train split. "test ID" is
every ID row of the test split (safe and unsafe of the three ID domains); "without controls"
drops its shape-control safe rows (source ``...:control``: safe text from the OOD sources,
e.g. benign jailbreakbench / anthropic-evals / CAA / SVEN rows, which the train split never has). AUROC everywhere is
unsafe-vs-safe with the score oriented higher = more unsafe.

Label audit rules (stated, so anyone can redo them):

* ``hh-rlhf-helpful`` unsafe rows are the *rejected* reply of an hh-rlhf harmless-base pair
  whose human turns carry no harm keyword and where neither reply refuses. A seeded sample
  (``random.Random(17)``, 30 rows of the sorted ids, train + test) was read by hand and each
  final assistant reply judged by this rule: **harmful** = it gives or endorses content that
  facilitates harm (violence, crime, drug acquisition, doxxing / stalking, hateful or
  demeaning claims about a group, dangerous misinformation, deception of a third party);
  **borderline** = mild (encourages a small rule break, engages with a privacy request
  without giving data, stereotypes); **not harmful** = anything else (deflection, low quality,
  wrong but harmless facts, a clarifying question). Verdicts: ``benchmarks/data/id_label_audit.json``.
  The same rule was applied to 30 ``hh-rlhf-harmless`` unsafe rows (``random.Random(18)``, after
  the relabel) and to the rejected reply of 30 raw harmless pairs whose chosen reply refuses
  (``random.Random(19)``: what a stricter "refusal pairs only" build would keep).
* Function-calling unsafe rows are the ground-truth call with ONE argument value changed,
  followed by a success report. Each has a safe row of the same BFCL item; the changed value
  is "checkable from the conversation" when the original value occurs in the user's text
  and the substituted one does not (``mood_data.build.derive.said_in``: case-insensitive,
  whole words / numbers). Since the 2026-12-01 relabel the build only makes checkable
  corruptions and ``hh-rlhf-helpful`` has no unsafe rows (the hand sample above was read on
  the build before it; each verdict names its raw pair).
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402,F401  (offline environment)

REPO = Path(__file__).resolve().parents[1]
AUDIT = REPO / "benchmarks" / "data" / "id_label_audit.json"
TURN = re.compile(r"<start_of_turn>(user|model)\n(.*?)<end_of_turn>", re.S)
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


# ----------------------------------------------------------------------------- data
def read_split(split: str) -> list[dict]:
    from mood_data.embedded import benchmark_dir

    with gzip.open(benchmark_dir() / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def id_cut() -> tuple[list[dict], list[dict]]:
    """(train part, validation slice) exactly as guard training cuts the embedded train split."""
    from train.data import load_train_split, train_validation_split
    from train.recipe import load_recipe
    from train.recipe_files import RECIPES_DIR

    fraction = load_recipe(RECIPES_DIR / "tiny" / "s.yaml").data.validation_fraction
    split = train_validation_split(load_train_split("embedded"), fraction, seed=0)
    return list(split["train"]), list(split["validation"])


def test_id_rows() -> list[dict]:
    from mood_data.domains import ID_DOMAINS

    return [r for r in read_split("test") if r["domain"] in ID_DOMAINS]


def last_reply(conversation: str) -> str:
    turns = [t for role, t in TURN.findall(conversation) if role == "model"]
    return turns[-1] if turns else ""


def user_text(conversation: str) -> str:
    return " ".join(t for role, t in TURN.findall(conversation) if role == "user" and not t.startswith("<tool_response>"))


def auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64))), 4)


# ----------------------------------------------------------------------------- labels
def label_audit() -> dict:
    from mood_data.build.derive import HARM_WORDS, REFUSAL, said_in

    rows = read_split("train") + read_split("test")
    out: dict = {}
    # 1. the hand-read sample of hh-rlhf-helpful "rejected" replies (drawn from the build before
    #    the relabel; each verdict names its raw pair, so it outlives the ids). Since the relabel
    #    none of them may be an unsafe row.
    audit = json.loads(AUDIT.read_text())
    verdicts = audit["hh-rlhf-helpful"]
    counts = {k: sum(v["verdict"] == k for v in verdicts) for k in ("harmful", "borderline", "not harmful")}
    still_unsafe = {r["source"] for r in rows if r["malign"] == 1} & {v["source"] for v in verdicts}
    out["hh_helpful_hand_sample"] = {"n": len(verdicts), **counts, "still_labelled_unsafe": len(still_unsafe)}
    for key in ("hh-rlhf-harmless", "hh-rlhf-harmless-refusal-pairs"):  # same rule, after the relabel
        out[f"{key}_hand_sample"] = {"n": len(audit[key]), **{k: sum(v["verdict"] == k for v in audit[key])
                                                              for k in ("harmful", "borderline", "not harmful")}}
    # 2. keyword proxies on every ID hh row: harm keyword / refusal in the final reply
    for dom in ("hh-rlhf-helpful", "hh-rlhf-harmless"):
        for mal in (0, 1):
            sel = [last_reply(r["conversation"]) for r in rows if r["domain"] == dom and r["malign"] == mal
                   and r["source"].startswith("hh-rlhf/")]
            out[f"{dom}/{'unsafe' if mal else 'safe'}"] = {
                "n": len(sel),
                "harm_keyword_in_reply": round(float(np.mean([bool(HARM_WORDS.search(t)) for t in sel])), 3) if sel else None,
                "refusal_in_reply": round(float(np.mean([bool(REFUSAL.search(t)) for t in sel])), 3) if sel else None,
            }
    # 3. paired design: how many unsafe hh rows have their own pair's chosen reply as a safe row
    for dom in ("hh-rlhf-helpful", "hh-rlhf-harmless"):
        chosen = {r["source"].rsplit(":", 1)[0] for r in rows if r["domain"] == dom and r["source"].endswith(":chosen")}
        rej = [r["source"].rsplit(":", 1)[0] for r in rows if r["domain"] == dom and r["source"].endswith(":rejected")]
        out[f"{dom}/unsafe_with_its_chosen_twin"] = round(sum(s in chosen for s in rej) / len(rej), 3) if rej else None
    # 4. function calling: is the wrong argument checkable from the user's words?
    safe_by_item: dict[str, dict] = {}
    for r in rows:
        if r["domain"] == "function-calling" and r["malign"] == 0:
            safe_by_item.setdefault(r["source"].split(":")[0], r)
    checkable = changed = 0
    for r in rows:
        if r["domain"] != "function-calling" or r["malign"] != 1:
            continue
        twin = safe_by_item.get(r["source"].split(":")[0])
        if twin is None:
            continue
        diff = _changed_values(twin["conversation"], r["conversation"])
        if diff is None:
            continue
        changed += 1
        text = user_text(r["conversation"])
        orig, new = diff
        checkable += int(said_in(orig, text) and not said_in(new, text))
    out["function-calling/unsafe_with_safe_twin"] = changed
    out["function-calling/wrong_value_checkable_from_user_text"] = round(checkable / max(changed, 1), 3)
    return out


def _changed_values(safe_conv: str, unsafe_conv: str):
    """(original, substituted) argument value between the first differing tool calls, or None."""
    for a, b in zip(TOOL_CALL.findall(safe_conv), TOOL_CALL.findall(unsafe_conv)):
        try:
            ca, cb = json.loads(a), json.loads(b)
        except json.JSONDecodeError:
            return None
        for k, v in (ca.get("arguments") or {}).items():
            w = (cb.get("arguments") or {}).get(k)
            if w != v:
                return v, w
    return None


# ----------------------------------------------------------------------------- baselines
def baselines(runs: list[Path] = ()) -> dict:
    """TF-IDF / format-only LR on the ID cut; with ``runs`` (``results.jsonl`` files of guard
    monitors) also each run's own scores and the TF-IDF scores on that run's ID test rows, so a
    guard and the baselines are compared on the same (seeded subset of) rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mood_data.build.baseline import format_features

    train, val = id_cut()
    test = test_id_rows()
    y = [r["malign"] for r in train]
    rows_by_id = {r["id"]: r for r in test}
    # each run file read once: its results on ID test rows, and those rows
    run_rows = {}
    for path in runs:
        res = [r for r in (json.loads(line) for line in open(path, encoding="utf-8")) if r["id"] in rows_by_id]
        run_rows[path] = (res, [rows_by_id[r["id"]] for r in res])
    views = {
        "tfidf(conversation)": lambda rs: [r["conversation"] for r in rs],
        "tfidf(last reply)": lambda rs: [last_reply(r["conversation"]) for r in rs],
    }
    out: dict = {}
    for name, view in views.items():
        model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50000),
                              LogisticRegression(C=4.0, max_iter=2000))
        model.fit(view(train), y)
        test_scores = model.decision_function(view(test))
        out[name] = _scores(model.decision_function(view(val)), val, test_scores, test)
        by_id = dict(zip((r["id"] for r in test), test_scores))
        for path, (_, sub) in run_rows.items():
            out[f"{name} on {path}"] = _test_scores([by_id[r["id"]] for r in sub], sub)
    # the domain prior: each row scored by its domain's unsafe share in the train part (what a
    # model gets from knowing the domain and nothing about the reply)
    share = {d: float(np.mean([r["malign"] for r in train if r["domain"] == d])) for d in {r["domain"] for r in train}}
    prior = lambda rs: [share.get(r["domain"], 0.0) for r in rs]  # noqa: E731
    out["domain prior"] = _scores(prior(val), val, prior(test), test)
    for path, (res, sub) in run_rows.items():
        out[f"run {path}"] = _test_scores([r["score"] for r in res], sub)
        out[f"domain prior on {path}"] = _test_scores(prior(sub), sub)
    fmt = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    fmt.fit([format_features(r["conversation"]) for r in train], y)
    out["format-only"] = _scores(fmt.decision_function([format_features(r["conversation"]) for r in val]), val,
                                 fmt.decision_function([format_features(r["conversation"]) for r in test]), test)
    return out


def _scores(val_scores, val, test_scores, test) -> dict:
    return {"validation": auroc([r["malign"] for r in val], val_scores), **_test_scores(test_scores, test)}


def _test_scores(test_scores, test) -> dict:
    out = {"test_id": auroc([r["malign"] for r in test], test_scores)}
    # the test split's ID-safe "control" rows (OOD-source text labelled safe, never in train)
    keep = [i for i, r in enumerate(test) if not r["source"].endswith(":control")]
    out["test_id_without_controls"] = auroc([test[i]["malign"] for i in keep], [test_scores[i] for i in keep])
    for dom in sorted({r["domain"] for r in test}):
        idx = [i for i, r in enumerate(test) if r["domain"] == dom and not r["source"].endswith(":control")]
        if len({test[i]["malign"] for i in idx}) < 2:
            continue  # a safe-only domain (hh-rlhf-helpful since the relabel)
        out[f"test:{dom}"] = auroc([test[i]["malign"] for i in idx], [test_scores[i] for i in idx])
    return out


# ----------------------------------------------------------------------------- probes
def probe(sizes: list[str], max_length: int, models: Path | None = None) -> dict:
    """Logistic regression on FROZEN pooled final hidden states of each tiny backbone: what a
    guard could reach without moving the backbone at all."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModel, AutoTokenizer

    from eval.engine.forward import collate, encode, length_batches, pool
    from mood_data.embedded import models_dir

    torch.set_num_threads(1)
    train, val = id_cut()
    test = test_id_rows()
    out: dict = {}
    for size in sizes:
        folder = (models or models_dir()) / f"tiny-{size}"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        t0 = time.perf_counter()
        feats = {}
        for name, rows in (("train", train), ("val", val), ("test", test)):
            enc = encode(tok, [r["conversation"] for r in rows], max_length)
            last = np.zeros((len(rows), model.config.hidden_size))
            mean = np.zeros_like(last)
            with torch.no_grad():
                for index in length_batches(enc.lengths, 32):
                    b = collate(enc, index, tok.pad_token_id)
                    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                    h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=pos).last_hidden_state
                    last[index] = pool(h, b["attention_mask"], "last").numpy()
                    mean[index] = pool(h, b["attention_mask"], "mean").numpy()
            feats[name] = {"last": last, "mean": mean}
        res = {}
        for pooling in ("last", "mean"):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
            clf.fit(feats["train"][pooling], [r["malign"] for r in train])
            res[pooling] = _scores(clf.decision_function(feats["val"][pooling]), val,
                                   clf.decision_function(feats["test"][pooling]), test)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[f"tiny-{size}"] = res
        print(f"tiny-{size}: {json.dumps(res)}", flush=True)
    return out


# ----------------------------------------------------------------------------- guards
GUARD_SETTINGS = {
    # name: recipe overrides (on top of recipes/tiny/<size>.yaml)
    "demo": ["guard.max_steps=60", "guard.max_length=160", "data.max_train_rows=1500"],
    "recipe": [],
    "lr3e-3": ["guard.learning_rate=3.0e-3"],
    "steps600": ["guard.max_steps=600"],
    "len512": ["guard.max_length=512", "guard.per_device_batch_size=4"],
    "r32-all": ["guard.lora.r=32", "guard.lora.alpha=64",
                "guard.lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"],
}


def guards(size: str, settings: list[str], work: Path) -> dict:
    """Train the guard LoRA with each setting; its validation AUROC (the guard's own ID slice)."""
    import torch

    from train.guard import train_guard
    from train.recipe import load_recipe
    from train.recipe_files import RECIPES_DIR

    torch.set_num_threads(1)
    out: dict = {}
    for name in settings:
        overrides = GUARD_SETTINGS[name] + [f"output_dir={work / f'{size}-{name}'}", "guard.eval_steps=null"]
        recipe = load_recipe(RECIPES_DIR / "tiny" / f"{size}.yaml", overrides)
        t0 = time.perf_counter()
        folder = train_guard(recipe)
        metrics = json.loads((folder / "metrics.json").read_text())
        out[name] = {"overrides": GUARD_SETTINGS[name], "validation_auroc": round(metrics["validation"]["eval_auroc"], 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"tiny-{size} {name}: {json.dumps(out[name])}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("labels", "baselines", "probe", "guards"))
    ap.add_argument("--sizes", default="xxs,s,m,l")
    ap.add_argument("--size", default="m")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--models", type=Path, default=None, help="folder of tiny-<size> folders (default: the embedded ones)")
    ap.add_argument("--settings", default=",".join(GUARD_SETTINGS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/moodguard-id-ceiling"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--runs", type=Path, nargs="*", default=[],
                    help="baselines: results.jsonl files of guard runs to compare on their own rows")
    args = ap.parse_args(argv)
    if args.part == "labels":
        res = label_audit()
    elif args.part == "baselines":
        res = baselines(args.runs)
    elif args.part == "probe":
        res = probe(args.sizes.split(","), args.max_length, args.models)
    else:
        res = guards(args.size, args.settings.split(","), args.work)
    print(json.dumps(res, indent=1))
    common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
