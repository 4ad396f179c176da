"""Peak memory of fitting (streaming Mahalanobis) and scoring for N and 10N conversations.

    python benchmarks/memory_scaling.py [--model embedded:tiny-s] [--n 300] [--factor 10] [--work DIR]

Rows are the embedded benchmark's train conversations, repeated and perturbed (a numbered
suffix, so every id and conversation is distinct) up to N and factor x N. Each measurement
runs `moodguard fit` / `moodguard score` in a FRESH subprocess and reads its peak RSS
(``ru_maxrss``), so the model load is counted the same way each time. The guard / LM adapters
are random LoRA adapters on the chosen backbone; the bundle scored is ``guard+maha``
(exported once from a tiny evaluation). Prints one line per run and the 10N / N ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO  # noqa: E402  (also sets the offline environment)


def child(argv: list[str]) -> int:
    """Run one moodguard command in this process; print its peak RSS (MiB) as JSON last."""
    from moodguard.cli import main

    code = main(argv)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"peak_rss_mib": peak_mib, "rc": code}))
    return code


def measure(argv: list[str], cwd: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return float(json.loads(last)["peak_rss_mib"])


def make_rows(n: int) -> list[dict]:
    """``n`` distinct ID train rows: embedded train rows repeated with a numbered suffix."""
    from mood_data.load import load_splits

    base = load_splits("embedded", splits=("train",))["train"]
    ids, convs, doms, mal = base["id"], base["conversation"], base["domain"], base["malign"]
    out = []
    for i in range(n):
        j, rep = i % len(ids), i // len(ids)
        out.append({"id": f"{ids[j]}~{rep}", "conversation": convs[j] + ("" if rep == 0 else f" [{rep}]"),
                    "domain": doms[j], "malign": int(mal[j])})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    from mood_data import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_jsonl(path, rows)


def random_adapters(model: str, out: Path) -> None:
    """Random (non-zero) guard LoRA + score head and causal-LM LoRA, saved like training does."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from train.modeling import resolve_model

    base = resolve_model(model)
    torch.manual_seed(0)
    for kind, cls, task in (("guard", AutoModelForSequenceClassification, TaskType.SEQ_CLS),
                            ("lm", AutoModelForCausalLM, TaskType.CAUSAL_LM)):
        m = cls.from_pretrained(base, **({"num_labels": 2} if kind == "guard" else {}))
        cfg = LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False)
        get_peft_model(m, cfg).save_pretrained(out / kind)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:tiny-s")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="moodguard-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    adapters = work / "adapters"
    if not (adapters / "guard").is_dir():
        random_adapters(args.model, adapters)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"base: {REPO / 'recipes' / 'tiny' / '_family.yaml'}\nmodel: {args.model}\ndtype: float32\n"
        f"data: {{source: embedded, max_test_unsafe_per_domain: 4, max_test_safe_per_domain: 8}}\n"
        f"eval: {{max_length: {args.max_length}, batch_size: {args.batch_size}, monitors: [guard+maha]}}\n",
        encoding="utf-8")

    def run_dir(name: str) -> Path:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        for kind in ("guard", "lm"):
            shutil.copytree(adapters / kind, d / kind)
        return d

    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        d = run_dir("run-bundle")
        if measure(["evaluate", "--recipe", str(recipe), "--n-boot", "20", "--no-plots", f"output_dir={d}"], work) <= 0:
            raise SystemExit("evaluate failed")
        measure(["export", "--recipe", str(recipe), "--monitor", "guard+maha", "--out", str(bundle),
                 f"output_dir={d}"], work)

    results = {}
    for n in (args.n, args.n * args.factor):
        rows = make_rows(n)
        data = work / f"data-{n}"
        write_jsonl(data / "train.jsonl", rows)
        d = run_dir(f"run-{n}")
        fit = measure(["fit", "--recipe", str(recipe), "--source", str(data), f"output_dir={d}"], work)
        score = measure(["score", "--monitor", str(bundle), str(data / "train.jsonl"), "--out",
                         str(work / f"scores-{n}.jsonl")], work)
        results[n] = (fit, score)
        print(f"n={n:>6}  fit peak RSS {fit:8.1f} MiB  score peak RSS {score:8.1f} MiB", flush=True)
    (a_fit, a_score), (b_fit, b_score) = results.values()
    print(f"ratio {args.factor}N/N: fit {b_fit / a_fit:.3f}  score {b_score / a_score:.3f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
