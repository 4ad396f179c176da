#!/usr/bin/env bash
# The distributed training configs on one device: one `zero2` and one `fsdp` guard training with
# ONE process each (accelerate_configs/zero2.yaml, fsdp.yaml as shipped, num_processes 1), each
# asserting that the FULL adapter was saved (LoRA weights + the score head), that the engine
# really ran (metrics.json: DEEPSPEED stage 2 / FSDP v2 FULL_STATE_DICT), that the adapter loads
# and scores finite logits, and recording the seconds. benchmarks/gpu_suite.sh calls this script.
#
#   bash benchmarks/gpu_train_configs.sh          # GPU: recipe dtype bf16, STEPS steps
#   SMOKE=1 bash benchmarks/gpu_train_configs.sh  # CPU: float32, 2 steps; fsdp runs through
#                                                 # tests/fsdp_cpu_rank.py (accelerate enables
#                                                 # FSDP only on accelerator devices)
# Env: RECIPE (default recipes/tiny/s.yaml), STEPS (default 20), OUT (default ./bench-out),
# PYTHON. Writes $OUT/train-configs.json; exit 1 when a check fails, 0 when both passed.
# zero2 needs deepspeed importable (the GPU machine lacks it: gpu_suite.sh brings it as a wheel).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
PY="${PYTHON:-python3}"
RECIPE="${RECIPE:-recipes/tiny/s.yaml}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       WANDB_MODE=offline TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
if [[ -n "${SMOKE:-}" ]]; then
  STEPS="${STEPS:-2}"; EXTRA=(dtype=float32 guard.max_length=64 guard.per_device_batch_size=4 guard.global_batch_size=8)
  MIXED=no; export ACCELERATE_USE_CPU=1 PYTHONPATH="$PWD/tests:$PYTHONPATH"; ENTRY=(-m fsdp_cpu_rank train.guard)
else
  STEPS="${STEPS:-20}"; EXTRA=(dtype=bfloat16 guard.max_length=512); MIXED=bf16; ENTRY=(-m train.guard)
fi
RUN="$OUT/train-configs"
rm -rf "$RUN"; mkdir -p "$RUN"
STATUS=0
RESULTS=()

one() {  # one CONFIG EXPECTED_JSON
  local config=$1 expect=$2 cfg="$RUN/$1.yaml" t0=$SECONDS rc
  "$PY" - "$config" "$cfg" "$MIXED" <<'EOF'
import sys, yaml
from train.launch import resolved_config_file
name, out, mixed = sys.argv[1:]
cfg = yaml.safe_load(resolved_config_file(name).read_text())  # DeepSpeed json path made absolute
cfg.update(num_processes=1, main_process_ip="127.0.0.1")
if cfg.get("distributed_type") == "FSDP":  # DeepSpeed takes its precision from its json ("auto")
    cfg["mixed_precision"] = mixed
yaml.safe_dump(cfg, open(out, "w"))
EOF
  local entry=(-m train.guard)
  [[ $config == fsdp ]] && entry=("${ENTRY[@]}")
  timeout -k 10 400 "$PY" -m accelerate.commands.launch --config_file "$cfg" --main_process_port 0 "${entry[@]}" \
    --recipe "$RECIPE" output_dir="$RUN/$config" guard.max_steps="$STEPS" guard.save_steps=1000 \
    "${EXTRA[@]}" >"$RUN/$config.log" 2>&1
  rc=$?
  local secs=$((SECONDS - t0))
  if (( rc == 0 )); then
    "$PY" - "$RUN/$config/guard" "$expect" "$RECIPE" >>"$RUN/$config.log" 2>&1 <<'EOF'
import json, sys
import torch
from safetensors.torch import load_file
from train.modeling import load_guard_model, load_tokenizer
from train.recipe import load_recipe
folder, expect, recipe = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
m = json.load(open(f"{folder}/metrics.json"))
for k, v in expect.items():
    assert m["engine"][k] == v, f"engine {k}: {m['engine'][k]} != {v}"
w = load_file(f"{folder}/adapter_model.safetensors")
assert any(k.endswith("score.weight") for k in w), "no score head in the adapter"
assert any("lora_A" in k for k in w) and any("lora_B" in k for k in w), "no LoRA weights in the adapter"
assert all(torch.isfinite(t.float()).all() for t in w.values()), "non-finite adapter weights"
base = load_recipe(recipe).model
model = load_guard_model(base, folder, "float32").eval()
tok = load_tokenizer(folder)
with torch.no_grad():
    logits = model(**tok(["hello there", "how do i hurt someone"], padding=True, return_tensors="pt")).logits
assert logits.shape == (2, 2) and torch.isfinite(logits).all()
print(f"CHECK OK: {len(w)} adapter tensors, engine {m['engine']}, train_loss {m['train']['train_loss']:.4f}")
EOF
    rc=$?
  fi
  local state=ok
  (( rc != 0 )) && { state=FAILED; STATUS=1; tail -n 5 "$RUN/$config.log" | cut -c1-200 | sed 's/^/  ! /'; }
  echo "[train-$config] rc=$rc ($state) ${secs}s, 1 process, $STEPS steps"
  RESULTS+=("{\"config\": \"$config\", \"ok\": $([[ $state == ok ]] && echo true || echo false), \"seconds\": $secs, \"steps\": $STEPS}")
}

one zero2 '{"distributed_type": "DEEPSPEED", "zero_stage": 2}'
one fsdp '{"distributed_type": "FSDP", "fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}'
( IFS=,; echo "{\"smoke\": $([[ -n "${SMOKE:-}" ]] && echo true || echo false), \"recipe\": \"$RECIPE\", \"runs\": [${RESULTS[*]}]}" ) >"$OUT/train-configs.json"
exit $STATUS
