"""End-to-end check of every stage on the accelerator: train guard -> train lm -> fit ->
evaluate (capped test) -> export -> score, each through the moodguard CLI in this process.

The backbone is a random-init Qwen2.5-0.5B-shaped model (the recipe's ``config_shape``, real
vocabulary of 151,936) built locally on the run device and saved with the embedded tiny
tokenizer (its ids are < 4096, inside the vocabulary): no hub. Data: the embedded benchmark
(train rows capped, test capped per domain).

Per stage the JSON records its seconds and, on CUDA, the peak memory it allocated above what
was allocated before it; a stage that allocated less than half the backbone's weights did not
run its model on the GPU and FAILS the check. On CPU (``--smoke``: a tiny Qwen2 shape with an 8k
vocabulary, a few steps) the check is that the evaluate run folders record the device the
policy resolved. Exit status 1 = a check failed, 2+ = a stage crashed.

    python benchmarks/e2e_stages.py --json out/e2e.json            # on one GPU (< 3 min on an H200)
    python benchmarks/e2e_stages.py --smoke --json out/e2e.json    # CPU check of the script
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device, free_memory, write_json  # noqa: E402

# --smoke: a tiny Qwen2 with an 8k vocabulary (the 151,936-row LM head alone would dominate a CPU run)
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 8192}
MONITORS = "guard,guard+maha,guard+ppl,guard+maha+ppl"


def cli():
    from moodguard.cli import main

    return main


def build_backbone(recipe_path: str, out: Path, smoke: bool) -> dict:
    """Random-init model of the recipe's shape (real vocabulary) + the embedded tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mood_data.embedded import default_tokenizer_path
    from train.modeling import load_tokenizer
    from train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    shape = dict(recipe.config_shape)
    if smoke:
        shape.update(SMOKE_SHAPE)
    cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    tok = load_tokenizer(str(default_tokenizer_path()))
    cfg.pad_token_id = tok.pad_token_id
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    free_memory()
    return {"params": n_params, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "weight_bytes": n_params * (2 if dtype == torch.bfloat16 else 4),
            "dtype": str(dtype).replace("torch.", "")}


def score_input(path: Path, n: int) -> Path:
    from mood_data.embedded import benchmark_dir

    with gzip.open(benchmark_dir() / "test.jsonl.gz", "rt", encoding="utf-8") as fh, \
            open(path, "w", encoding="utf-8") as out:
        for i, line in enumerate(fh):
            if i >= n:
                break
            row = json.loads(line)
            out.write(json.dumps({"id": row["id"], "conversation": row["conversation"]}) + "\n")
    return path


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/qwen2.5/0.5b.yaml")
    ap.add_argument("--work", default=None, help="working folder (default: next to --json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, a few steps (CPU check of the script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work or (Path(args.json).parent if args.json else Path("bench-out")) / "e2e")
    work.mkdir(parents=True, exist_ok=True)
    cuda = device().type == "cuda"
    steps, rows, per_domain, n_score, length = (1, 48, 2, 16, 64) if args.smoke else (8, 1024, 24, 512, 1024)
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "smoke": args.smoke, "stages": []}
    t0 = time.perf_counter()
    res["backbone"] = build_backbone(args.recipe, work / "model", args.smoke)
    res["build_seconds"] = time.perf_counter() - t0
    overrides = [f"model={work / 'model'}", f"output_dir={work / 'run'}", "config_shape=null", "accelerate.config=null", "accelerate.num_processes=1",
                 f"dtype={'bfloat16' if cuda else 'float32'}", "data.source=embedded", f"data.max_train_rows={rows}",
                 f"data.max_test_unsafe_per_domain={per_domain}", f"data.max_test_safe_per_domain={per_domain}",
                 f"eval.max_length={length}", "eval.batch_size=16"]
    for kind in ("guard", "lm"):
        overrides += [f"{kind}.max_steps={steps}", f"{kind}.global_batch_size=16", f"{kind}.per_device_batch_size=16",
                      f"{kind}.max_length={length}", f"{kind}.save_steps=1000", f"{kind}.logging_steps=1"]
    recipe = str(Path(args.recipe).resolve())
    # the recipe + overrides of this run, for the suite's zero2 / fsdp training runs
    (work / "recipe-args.txt").write_text("\n".join([recipe, *overrides]) + "\n", encoding="utf-8")
    bundle, inp = work / "bundle", score_input(work / "score-input.jsonl", n_score)
    stages = [
        ("train guard", ["train", "guard", "--recipe", recipe, *overrides]),
        ("train lm", ["train", "lm", "--recipe", recipe, *overrides]),
        ("fit", ["fit", "--recipe", recipe, *overrides]),
        ("evaluate", ["evaluate", "--recipe", recipe, "--monitors", MONITORS, "--n-boot", "50", "--no-plots",
                      *overrides]),
        ("export", ["export", "--recipe", recipe, "--monitor", "guard+maha+ppl", "--out", str(bundle), *overrides]),
        ("score", ["score", "--monitor", str(bundle), str(inp), "--out", str(work / "scores.jsonl"), "--overwrite"]),
    ]
    need = res["backbone"]["weight_bytes"] / 2  # a stage that ran its model on the GPU allocated at least this
    run = cli()
    failed = crashed = False
    for name, argv_ in stages:
        free_memory()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        t = time.perf_counter()
        try:
            rc = run(argv_)
        except BaseException as exc:  # noqa: BLE001 - recorded, the suite goes on
            traceback.print_exc()
            rc, err = 99, f"{type(exc).__name__}: {exc}"
        else:
            err = None if rc == 0 else f"exit status {rc}"
        st = {"stage": name, "seconds": round(time.perf_counter() - t, 2), "rc": rc}
        if cuda:
            st["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
            st["allocated_on_gpu"] = st["cuda_peak_mb"] * 2**20 >= need
        if err:
            st["error"] = err[:300]
            crashed = True
        elif cuda and not st["allocated_on_gpu"]:
            failed = True
        res["stages"].append(st)
        gpu = f"  peak {st['cuda_peak_mb']:.0f} MB on GPU {'ok' if st['allocated_on_gpu'] else 'TOO LITTLE'}" if cuda else ""
        print(f"e2e {name:12s} {st['seconds']:7.1f} s{gpu}{'  ' + st['error'] if err else ''}", flush=True)
        if err:
            break
    if not crashed:  # where the evaluate stage says it ran, and what score wrote
        metas = [json.loads(p.read_text()) for p in sorted((work / "run" / "eval").glob("*/meta.json"))]
        res["evaluate_devices"] = sorted({m["device"] for m in metas})
        want = "cuda" if cuda else "cpu"
        if not metas or any(not m["device"].startswith(want) for m in metas):
            failed = True
        scored = [json.loads(x) for x in (work / "scores.jsonl").read_text().splitlines()]
        res["scored_rows"] = len(scored)
        if len(scored) != n_score or any(r["score"] != r["score"] for r in scored):
            failed = True
        print(f"e2e checks: evaluate ran on {res['evaluate_devices']}, score wrote {len(scored)}/{n_score} rows",
              flush=True)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["ok"] = not (failed or crashed)
    write_json(args.json, res)
    print(f"e2e {'ok' if res['ok'] else 'FAILED'} in {res['total_seconds']} s "
          f"(backbone {res['backbone']['params'] / 1e6:.1f}M params, vocab {res['backbone']['vocab_size']})", flush=True)
    return 2 if crashed else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
