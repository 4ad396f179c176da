#!/usr/bin/env bash
# Throughput suite for one GPU (H100): guard training (moodguard vs plain Trainer+PEFT) and
# scoring (fused one-pass vs mood-bench's three passes) on random-init Qwen2.5 0.5B / 1.5B / 7B
# shapes (real vocabulary), conversation-like lengths (median 450 tokens, max 2048), bf16, sdpa.
#
#   bash benchmarks/gpu_suite.sh                 # whole suite, < 9 minutes on an H100
#   SIZES="0.5b" bash benchmarks/gpu_suite.sh    # some sizes only
#   SMOKE=1 bash benchmarks/gpu_suite.sh         # CPU check of the script: tiny recipes, few steps
#
# Each benchmark writes "$OUT/<name>.json" and "$OUT/<name>.log" (OUT defaults to ./bench-out);
# the console gets a few lines per benchmark and a summary table at the end. A failing or
# out-of-memory size is reported and the suite goes on. Needs torch, transformers, peft,
# accelerate (no datasets / deepspeed / wandb / evaluate, no hub access). Wheels in .whl/, if
# any, are installed to /tmp/site first (dropped again if transformers' Trainer stops importing).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
       WANDB_DISABLED=true TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-530}"   # seconds for the whole suite; a benchmark gets at most what is left
START=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import transformers.trainer" >/dev/null 2>&1; then
      echo "wheels break 'import transformers.trainer'; running without them"
      export PYTHONPATH="${PYTHONPATH#/tmp/site}"; export PYTHONPATH="${PYTHONPATH#:}"
    fi
  else
    echo "wheel install failed; continuing without"
  fi
fi

"$PY" - <<'EOF'
import torch, transformers, peft, accelerate
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
print(f"device {gpu} | torch {torch.__version__} transformers {transformers.__version__} "
      f"peft {peft.__version__} accelerate {accelerate.__version__}")
EOF

run() {  # run NAME LIMIT_S SCRIPT ARGS...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 20 )); then echo "[$name] skipped: suite budget spent"; return; fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  timeout -k 10 "$limit" "$PY" "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  local rc=$?
  local how="ok"; (( rc == 124 || rc == 137 )) && how="TIMEOUT after ${limit}s"; (( rc == 1 )) && how="finished with a failed check"
  (( rc > 1 && rc != 124 && rc != 137 )) && how="FAILED"
  echo "[$name] rc=$rc ($how) $((SECONDS - t0))s"
  grep -E '^(train |score |plain |moodguard |fused |baseline|speed-up|ratio)' "$OUT/$name.log" | cut -c1-160 | sed 's/^/  /'
  if (( rc > 1 )); then grep -v -E 'it/s\]|Warning|warn\(' "$OUT/$name.log" | tail -n 4 | cut -c1-200 | sed 's/^/  ! /'; fi
}

COMMON=(--random-init --target-median 450 --max-length 2048)
if [[ -n "${SMOKE:-}" ]]; then
  SIZES="${SIZES:-s m}"
  for s in $SIZES; do
    run "train-tiny-$s" 300 benchmarks/train_throughput.py --recipe "recipes/tiny/$s.yaml" --steps 2 \
        --random-init --target-median 120 --max-length 256 --max-tokens-per-forward 1024
    run "score-tiny-$s" 300 benchmarks/score_throughput.py --recipe "recipes/tiny/$s.yaml" --n 32 --batch-size 16 \
        --baseline-batch-size 16 --random-init --target-median 120 --max-length 256
  done
else
  SIZES="${SIZES:-0.5b 1.5b 7b}"
  for s in $SIZES; do
    case $s in
      # steps: optimizer steps of 64 rows; budget: tokens per forward of our trainer (row chunks);
      # n: conversations scored; the baseline starts at batch 16 and halves on OOM
      0.5b) steps=6; budget=16384; n=128; limits=(150 100) ;;
      1.5b) steps=5; budget=8192;  n=96;  limits=(180 120) ;;
      7b)   steps=4; budget=0;     n=64;  limits=(300 200) ;;
      *) echo "unknown size $s"; continue ;;
    esac
    run "train-$s" "${limits[0]}" benchmarks/train_throughput.py --recipe "recipes/qwen2.5/$s.yaml" "${COMMON[@]}" \
        --steps "$steps" --max-tokens-per-forward "$budget"
    run "score-$s" "${limits[1]}" benchmarks/score_throughput.py --recipe "recipes/qwen2.5/$s.yaml" "${COMMON[@]}" \
        --n "$n" --batch-size 16 --baseline-batch-size 16
  done
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| benchmark | plain / baseline | moodguard / fused | speed-up | notes |", "|---|---|---|---|---|"]
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    if p.name.startswith("train"):
        def cell(k):
            x = r.get(k, {})
            if "error" in x:
                return x["error"]
            mfu = f", MFU {x['mfu']:.1%}" if "mfu" in x else ""
            return f"{x['tokens_per_s']:.0f} tok/s, pad {x['padding_fraction']:.0%}, {x['peak_mb'] / 1024:.1f} GiB{mfu}" if x else "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"| {p.stem} | {cell('plain')} | {cell('moodguard')} | {sp} | median {r['lengths']['median']:.0f} tok |")
    else:
        att = "; ".join(f"b{a['batch_size']} " + (a["error"] if "error" in a else f"{a['conv_per_s']:.1f}/s")
                        for a in r.get("baseline_attempts", []))
        fu = (f"{r['fused_conv_per_s']:.1f} conv/s (b{r['batch_size']}, {r['fused_peak_mb'] / 1024:.1f} GiB)"
              if "fused_conv_per_s" in r else r.get("fused_error", "-"))
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        eq = "equal" if all(r.get("scores_equal", {"": False}).values()) else "NOT equal / unchecked"
        lines.append(f"| {p.stem} | {att or '-'} | {fu} | {sp} | scores {eq} |")
text = "\n".join(lines)
(out / "summary.md").write_text(text + "\n")
print(text)
EOF
echo "suite done in $((SECONDS - START))s; JSON, logs and summary.md in $OUT"
