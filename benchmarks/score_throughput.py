"""Throughput of guard + Mahalanobis + perplexity scoring: fused one-pass vs mood-bench's three passes.

    python benchmarks/score_throughput.py --recipe recipes/tiny/s.yaml --random-init --n 128

Fused (eval.forward / eval.perplexity): the base model loaded once with both adapters, rows
sorted by length into batches (little padding), ONE guard forward per batch gives the guard
logits and the pooled features, ONE LM forward gives hidden states whose NLL is computed in
256-position chunks. Baseline (mood-bench's way): batches in dataset order padded to the
batch maximum; a guard pass (sequence-classification model + adapter), a separate feature
pass (the same model with ``output_hidden_states``) and a perplexity pass with full
``[batch, length, vocab]`` logits (causal LM + adapter). Same weights and rows in one run;
the scores are checked equal (allclose) and the speed ratio and padding fractions printed.

``--random-init`` builds the backbone from the recipe's ``config_shape`` (or its model's
config / tiny shape) with random weights and random LoRA adapters: no trained run needed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.forward import (SharedBackbone, encode, guard_pass, length_batches, padding_fraction,  # noqa: E402
                          read_num_labels)
from eval.monitor import FeatureScorer, guard_scores  # noqa: E402
from eval.perplexity import full_logits_nll, perplexity_from_nll, perplexity_pass, target_mask  # noqa: E402


def random_backbone(recipe, texts: list[str], out: Path):
    """Random-init base (recipe shape) + random guard / LM LoRA adapters saved under ``out``."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from train.modeling import load_tokenizer, resolve_model
    from train.tiny import TINY_SIZES, tiny_config, train_tokenizer

    try:
        tok = load_tokenizer(recipe.tokenizer or recipe.model)
    except Exception:  # noqa: BLE001 - no tokenizer available offline: train a small one on the data
        tok = train_tokenizer(texts, vocab_size=2048)
        tok.padding_side = tok.truncation_side = "left"
    if recipe.config_shape:
        shape = dict(recipe.config_shape)
        cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    else:
        size = str(recipe.model).rsplit("tiny-", 1)[-1]
        try:
            cfg = AutoConfig.from_pretrained(resolve_model(recipe.model))
        except Exception:  # noqa: BLE001 - embedded model not built: its shape from train.tiny
            if size not in TINY_SIZES:
                raise
            cfg = tiny_config(size, tok)
    cfg.vocab_size = max(int(cfg.vocab_size), len(tok))
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    for kind, task, auto in (("guard", TaskType.SEQ_CLS, AutoModelForSequenceClassification),
                             ("lm", TaskType.CAUSAL_LM, AutoModelForCausalLM)):
        lora = recipe.section(kind).lora
        kw = {"num_labels": 2} if kind == "guard" else {}
        model = auto.from_pretrained(out / "base", **kw)
        cfg_l = LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                           init_lora_weights=False)
        get_peft_model(model, cfg_l).save_pretrained(out / kind)
    return out / "base", out / "guard", out / "lm", tok


@torch.no_grad()
def baseline(base, guard_dir, lm_dir, tok, texts, batch_size, max_length, maha, dtype):
    """mood-bench's three passes in dataset order; returns (guard, maha, ppl, seconds)."""
    from train.modeling import load_causal_lm, load_guard_model

    guard_model = load_guard_model(base, guard_dir, dtype=dtype).eval()
    lm = load_causal_lm(base, lm_dir, dtype=dtype).eval()
    batches = length_batches([0] * len(texts), batch_size, sort=False)
    t0 = time.perf_counter()
    g, f, p = [], [], []
    for idx in batches:  # pass 1: guard
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        g.append(guard_model(**b).logits.float())
    for idx in batches:  # pass 2: features
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = guard_model(**b, output_hidden_states=True)
        f.append(maha.score(out.hidden_states[-1][:, -1]))
    for idx in batches:  # pass 3: perplexity with full logits
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        logits = lm(**b).logits
        s, c = full_logits_nll(logits, b["input_ids"], target_mask(b["attention_mask"]))
        p.append(perplexity_from_nll(s.numpy(), c.numpy()))
    seconds = time.perf_counter() - t0
    return guard_scores(torch.cat(g).numpy()), np.concatenate(f), np.concatenate(p), seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--random-init", action="store_true", help="random backbone + adapters of the recipe's shape")
    ap.add_argument("--n", type=int, default=128, help="conversations to score")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    ap.add_argument("--max-length", type=int, default=None, help="default: the recipe's eval.max_length")
    ap.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mood_data.load import load_splits
    from train.recipe import load_recipe

    from eval.detectors import MahalanobisFitter
    from eval.monitor import adapter_dirs
    from train.modeling import load_tokenizer, resolve_model

    recipe = load_recipe(args.recipe, args.overrides)
    bs = args.batch_size or recipe.eval.batch_size
    max_length = args.max_length or recipe.eval.max_length
    test = load_splits(args.source or recipe.data.source, splits=("test",))["test"]
    pick = np.random.default_rng(0).permutation(len(test))[: args.n]
    texts = [test[int(i)]["conversation"] for i in pick]
    tmp = tempfile.TemporaryDirectory(prefix="moodguard-bench-")
    dtype = "float32" if recipe.dtype == "auto" else recipe.dtype
    if args.random_init:
        base, guard_dir, lm_dir, tok = random_backbone(recipe, texts, Path(tmp.name))
    else:
        guard_dir, lm_dir = adapter_dirs(recipe)
        base = resolve_model(recipe.model)
        tok = load_tokenizer(recipe.tokenizer or base)
    assert read_num_labels(guard_dir) == 2

    backbone = SharedBackbone.from_pretrained(base, guard_dir, lm_dir, dtype=dtype)
    enc = encode(tok, texts, max_length)
    # a Mahalanobis detector for both paths (fitted here on these rows' features; not timed)
    fitter = MahalanobisFitter()
    guard_pass(backbone, enc, batch_size=bs, layers=(-1,), on_batch=lambda b: fitter.update(b.features[-1]),
               desc="fit maha")
    maha = fitter.finalize("empirical", 1e-6)

    t0 = time.perf_counter()
    scorer = FeatureScorer(len(texts), {"maha": {-1: maha}})
    timed = encode(tok, texts, max_length)  # one tokenisation serves both passes
    logits = guard_pass(backbone, timed, batch_size=bs, layers=(-1,), on_batch=scorer)
    ppl = perplexity_pass(backbone, timed, batch_size=bs)
    fused_s = time.perf_counter() - t0
    fused = (guard_scores(logits), scorer.scores["maha"], ppl)
    del backbone

    base_g, base_m, base_p, base_s = baseline(base, guard_dir, lm_dir, tok, texts, bs, max_length, maha, dtype)
    equal = {
        "guard": bool(np.allclose(fused[0], base_g, rtol=1e-3, atol=1e-3)),
        "maha": bool(np.allclose(fused[1], base_m, rtol=1e-3, atol=1e-3)),
        "ppl": bool(np.allclose(fused[2], base_p, rtol=1e-3, atol=1e-3)),
    }
    lengths = enc.lengths
    res = {
        "n": len(texts), "batch_size": bs, "max_length": max_length, "threads": torch.get_num_threads(),
        "fused_conv_per_s": len(texts) / fused_s, "baseline_conv_per_s": len(texts) / base_s,
        "speedup": base_s / fused_s, "fused_padding": padding_fraction(lengths, length_batches(lengths, bs)),
        "baseline_padding": padding_fraction(lengths, length_batches(lengths, bs, sort=False)),
        "scores_equal": equal, "mean_tokens": float(lengths.mean()),
    }
    print(f"fused   : {res['fused_conv_per_s']:8.1f} conv/s  padding {res['fused_padding']:.1%}")
    print(f"baseline: {res['baseline_conv_per_s']:8.1f} conv/s  padding {res['baseline_padding']:.1%} (3 passes, full logits)")
    print(f"ratio fused/baseline: {res['speedup']:.2f}x   scores equal: {equal}")
    if args.json:
        from mood_data.atomic import write_json

        write_json(args.json, res)
    tmp.cleanup()
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
