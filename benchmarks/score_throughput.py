"""Throughput of guard + Mahalanobis + perplexity scoring: fused one-pass vs mood-bench's three passes.

    python benchmarks/score_throughput.py --recipe recipes/tiny/s.yaml --random-init --n 128
    python benchmarks/score_throughput.py --recipe recipes/qwen2.5/7b.yaml --random-init --n 64 \\
        --target-median 450 --max-length 2048 --batch-size 16 --json out/score-7b.json

Fused (eval.engine.forward / eval.engine.perplexity): the base model loaded once with both adapters, rows
sorted by length into batches (little padding), ONE guard forward per batch gives the guard
logits and the pooled features, ONE LM forward gives hidden states whose NLL is computed in
256-position chunks. Baseline (mood-bench's way, same weights in the same process): batches in
dataset order padded to the batch maximum; a guard pass (classification head on every
position, last token read), a separate feature pass (``output_hidden_states``) and a perplexity
pass with full ``[batch, length, vocab]`` logits (``log_softmax`` in float32). The baseline
shares the fused path's weights (mood-bench holds a guard model and an LM: more weight memory
than here, so its memory figure is a lower bound). If the baseline runs out of memory it is
retried at half the batch size (recorded). Scores are checked equal: max |a - b| / max |b|
within 1e-3 (float32) or 5e-2 (bf16/fp16: different padding changes the rounding).

``--random-init`` builds the backbone from the recipe's ``config_shape`` (real vocabulary: the LM
head cost is realistic) with random weights and random LoRA adapters, directly on the GPU in the
recipe's dtype; an unreachable hub tokenizer falls back to the embedded tiny one (ids < 4096).
``--target-median`` makes conversation-like lengths (see ``benchmarks/common.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (benchmark_tokenizer, device, device_name, free_memory, is_oom,  # noqa: E402
                               length_summary, load_rows, peak_memory_mb, random_model, recipe_config, reset_peak,
                               run_dtype, sync, token_rows, write_json)
from eval.engine.forward import Encoded, SharedBackbone, collate, guard_pass, length_batches  # noqa: E402
from train.data import padding_fraction  # noqa: E402
from eval.engine.forward import pad_id as backbone_pad_id  # noqa: E402
from eval.engine.detectors.logits import guard_scores  # noqa: E402
from eval.engine.planner import FeatureScorer  # noqa: E402
from eval.engine.perplexity import full_logits_nll, perplexity_from_nll, perplexity_pass, target_mask  # noqa: E402


def random_backbone(recipe, tok, dtype: torch.dtype) -> SharedBackbone:
    """Random base of the recipe's shape + random ``lm`` and ``guard`` LoRA adapters + a random
    2-label head, built in memory on the run device."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = recipe_config(recipe, tok)
    model = random_model(AutoModelForCausalLM, cfg, dtype, recipe.attn_implementation or "sdpa")
    for i, kind in enumerate(("lm", "guard")):
        lora = recipe.section(kind).lora
        lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha,
                          target_modules=lora.target_modules, init_lora_weights=False)
        model = get_peft_model(model, lcfg, adapter_name=kind) if i == 0 else model
        if i:
            model.add_adapter(kind, lcfg)
    torch.manual_seed(1)
    head = torch.nn.Linear(cfg.hidden_size, 2).to(device=device(), dtype=dtype)
    model.eval()
    return SharedBackbone(model, head.eval(), has_lm=True)


def _to(batch: dict, dev) -> dict:
    return {k: v.to(dev) for k, v in batch.items()}


@torch.no_grad()
def baseline(backbone: SharedBackbone, enc: Encoded, batch_size: int, maha):
    """mood-bench's three passes in dataset order; returns (guard, maha, ppl, seconds)."""
    pad, dev = backbone_pad_id(backbone), backbone.device
    decoder = backbone.causal_lm.get_decoder()
    batches = length_batches(np.zeros(len(enc.input_ids)), batch_size, sort=False)
    sync()
    t0 = time.perf_counter()
    g, f, p = [], [], []
    with backbone._adapter("guard"):
        for idx in batches:  # pass 1: guard (sequence-classification head on every position)
            b = _to(collate(enc, idx, pad), dev)
            out = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            g.append(backbone.head(out.last_hidden_state)[:, -1].float().cpu())
        for idx in batches:  # pass 2: features
            b = _to(collate(enc, idx, pad), dev)
            out = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                          output_hidden_states=True)
            f.append(maha.score(out.hidden_states[-1][:, -1].double().cpu()))
            del out
    with backbone._adapter("lm"):
        for idx in batches:  # pass 3: perplexity with full logits
            b = _to(collate(enc, idx, pad), dev)
            logits = backbone.causal_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                        use_cache=False).logits
            s, c = full_logits_nll(logits, b["input_ids"], target_mask(b["attention_mask"]))
            del logits
            p.append(perplexity_from_nll(s.cpu().numpy(), c.cpu().numpy()))
    sync()
    seconds = time.perf_counter() - t0
    return guard_scores(torch.cat(g).numpy()), np.concatenate(f), np.concatenate(p), seconds


def fused(backbone: SharedBackbone, enc: Encoded, batch_size: int, maha):
    """The one-pass path (what ``eval.run.evaluate`` runs); returns (guard, maha, ppl, seconds)."""
    sync()
    t0 = time.perf_counter()
    scorer = FeatureScorer(len(enc.input_ids), {"maha": {-1: maha}})
    logits = guard_pass(backbone, enc, batch_size=batch_size, layers=(-1,), on_batch=scorer)
    ppl = perplexity_pass(backbone, enc, batch_size=batch_size)
    sync()
    return guard_scores(logits), scorer.scores["maha"], ppl, time.perf_counter() - t0


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--random-init", action="store_true", help="random backbone + adapters of the recipe's shape")
    ap.add_argument("--n", type=int, default=128, help="conversations to score")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    ap.add_argument("--baseline-batch-size", type=int, default=None, help="default: --batch-size (halved on OOM)")
    ap.add_argument("--max-length", type=int, default=None, help="default: the recipe's eval.max_length")
    ap.add_argument("--target-median", type=float, default=None,
                    help="conversation-like token lengths with this median (default: test rows as they are)")
    ap.add_argument("--length-sigma", type=float, default=0.5, help="log-normal sigma of --target-median lengths")
    ap.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer (default: the recipe's; embedded tiny if unreachable)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--skip-baseline", action="store_true", help="time the fused path only")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from eval.engine.detectors.mahalanobis import MahalanobisFitter
    from eval.run.backbone import adapter_dirs
    from eval.run.context import resolve
    from train.modeling import resolve_model
    from train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    bs = args.batch_size or recipe.eval.batch_size
    max_length = args.max_length or recipe.eval.max_length
    dtype = run_dtype(recipe)
    tok, tok_name = benchmark_tokenizer(recipe, args.tokenizer)
    texts, labels = load_rows("test", args.source or recipe.data.source)
    rows, _ = token_rows(tok, texts, labels, n=args.n, max_length=max_length, target_median=args.target_median,
                         sigma=args.length_sigma)
    enc = Encoded(rows)
    if args.random_init:
        backbone = random_backbone(recipe, tok, dtype)
    else:
        guard_dir, lm_dir = adapter_dirs(resolve(recipe).model)
        backbone = SharedBackbone.from_pretrained(resolve_model(recipe.model), guard_dir, lm_dir, dtype=dtype,
                                                  device=device())
    lengths = enc.lengths
    res = {"recipe": recipe.name, "device": device_name(), "dtype": str(dtype).replace("torch.", ""),
           "random_init": args.random_init, "tokenizer": tok_name, "n": len(rows), "batch_size": bs,
           "max_length": max_length, "target_median": args.target_median, "lengths": length_summary(rows),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "fused_padding": padding_fraction(lengths, length_batches(lengths, bs))}

    # a Mahalanobis detector for both paths, fitted on these rows' features (untimed; also the
    # guard warm-up), plus an untimed LM warm-up on short rows
    fitter = MahalanobisFitter()
    guard_pass(backbone, enc, batch_size=bs, layers=(-1,), on_batch=lambda b: fitter.update(b.features[-1]),
               desc="fit maha")
    maha = fitter.finalize("ledoit_wolf", 1e-6)
    perplexity_pass(backbone, Encoded([r[-128:] for r in rows[:bs]]), batch_size=bs, desc="warm-up")

    failed = False
    reset_peak()
    try:
        *fused_scores, fused_s = fused(backbone, enc, bs, maha)
        res.update(fused_conv_per_s=len(rows) / fused_s, fused_seconds=fused_s, fused_peak_mb=peak_memory_mb())
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        failed, fused_scores = True, None
        res["fused_error"] = "OOM at batch size %d" % bs
    free_memory()

    attempts = []
    base_bs = args.baseline_batch_size or bs
    while not args.skip_baseline and base_bs >= 1:
        reset_peak()
        oom = False
        try:
            *base_scores, base_s = baseline(backbone, enc, base_bs, maha)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            oom = True
        if oom:  # outside the except block: the traceback's tensors are released first
            attempts.append({"batch_size": base_bs, "error": "OOM"})
            free_memory()
            base_bs //= 2
            continue
        attempts.append({"batch_size": base_bs, "conv_per_s": len(rows) / base_s, "seconds": base_s,
                         "peak_mb": peak_memory_mb(),
                         "padding": padding_fraction(lengths, length_batches(lengths, base_bs, sort=False))})
        res.update(baseline_conv_per_s=len(rows) / base_s, baseline_batch_size=base_bs, baseline_seconds=base_s,
                   baseline_peak_mb=attempts[-1]["peak_mb"], baseline_padding=attempts[-1]["padding"])
        if fused_scores is not None:
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            errs = {k: max_rel_err(a, b) for k, a, b in zip(("guard", "maha", "ppl"), fused_scores, base_scores)}
            res["max_rel_err"] = errs
            res["scores_equal"] = {k: bool(e <= tol) for k, e in errs.items()}
            res["speedup"] = res["fused_conv_per_s"] / res["baseline_conv_per_s"]
            failed |= not all(res["scores_equal"].values())
        break
    res["baseline_attempts"] = attempts

    lens = res["lengths"]
    print(f"score {recipe.name} on {res['device']} ({res['dtype']}): {len(rows)} rows, median {lens['median']:.0f} "
          f"tokens (max {lens['max']}), batch {bs}")
    if "fused_conv_per_s" in res:
        print(f"fused   : {res['fused_conv_per_s']:8.1f} conv/s  padding {res['fused_padding']:.1%}  "
              f"peak {res['fused_peak_mb']:.0f} MB")
    else:
        print(f"fused   : {res['fused_error']}")
    for a in attempts:
        if "error" in a:
            print(f"baseline: {a['error']} at batch {a['batch_size']}")
        else:
            print(f"baseline: {a['conv_per_s']:8.1f} conv/s  padding {a['padding']:.1%}  peak {a['peak_mb']:.0f} MB  "
                  f"batch {a['batch_size']} (3 passes, full logits)")
    if "speedup" in res:
        print(f"ratio fused/baseline: {res['speedup']:.2f}x   scores equal: {res['scores_equal']}")
    write_json(args.json, res)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
