#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86_64, no internet). It has torch, transformers,
# peft, accelerate, pyarrow, pandas, numpy, tokenizers, safetensors, huggingface-hub, tqdm,
# pyyaml, xxhash, scikit-learn, matplotlib; it lacks datasets, dill, multiprocess, deepspeed,
# wandb and evaluate. This writes those (and the dependencies that machine may lack) to .whl/
# (git-ignored, ~35 MB); benchmarks/gpu_suite.sh installs from it first.
#
#   bash benchmarks/build_wheelhouse.sh                 # here, with pip and the registry
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=580)   # the device call
#
# `carry` moves ignored paths with the working tree (64 MiB in all): .whl/ is the only one the
# suite needs. deepspeed is an sdist: its wheel is built here without ops (they JIT-compile with
# nvcc on the GPU machine at first use).
set -eu
cd "$(dirname "$0")/.."
WH="${WH:-.whl}"
PYV="${PYV:-3.12}"
PIP="${PIP:-python -m pip}"
mkdir -p "$WH"
TARGET=(--python-version "$PYV" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --only-binary=:all:)
# the six missing packages, then their dependencies that are not on the machine's list above
$PIP download -q --no-deps -d "$WH" "${TARGET[@]}" \
  datasets dill multiprocess evaluate wandb \
  aiohttp aiosignal aiohappyeyeballs attrs frozenlist multidict propcache yarl \
  pydantic pydantic-core annotated-types typing-inspection \
  hjson py-cpuinfo ninja msgpack einops nvidia-ml-py \
  protobuf sentry-sdk gitpython gitdb smmap click platformdirs \
  requests idna urllib3 certifi charset-normalizer
$PIP wheel -q --no-deps --no-build-isolation -w "$WH" deepspeed
ls "$WH" | sed 's/^/  /'
du -sh "$WH"
