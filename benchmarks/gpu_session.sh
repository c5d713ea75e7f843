#!/usr/bin/env bash
# One device-machine session: GPU tests, then benchmarks. Usage (on the device, repo root):
#   bash benchmarks/gpu_session.sh [pytest-args...]
# Expects bitsandbytes (and other missing wheels) unpacked under .device/site (see README, "GPU runs").
set -u
export PYTHONPATH="$PWD/src:$PWD/.device/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export QLORA_RESULTS="$OUT/results.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
python3 -m pytest -q tests/nf4 -p no:cacheprovider -rf "$@" 2>&1 | tail -40 | tee "$OUT/tests.log"
python3 benchmarks/dequant.py ${DEQUANT_ARGS:---sweep} 2>&1 | tee "$OUT/dequant.log"
