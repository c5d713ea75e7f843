#!/usr/bin/env bash
# One device-machine session. Usage (on the device, repo root):
#   PARTS="tests dequant train" bash benchmarks/gpu_session.sh [pytest-args...]
#     tests       the GPU tests (tests/nf4, tests/test_gpu_training.py) plus anything in pytest-args
#     parallel    tests/parallel: FSDP2 over NCCL when the machine has 2+ GPUs (the Trainer tests stay on gloo)
#     dequant     benchmarks/dequant.py ($DEQUANT_ARGS, default --sweep)
#     train       the embedded default `qlora-fsdp train` on the GPU in bf16, timed
#     train_step  benchmarks/train_step.py $TRAIN_STEP_ARGS: ours vs transformers + peft + bitsandbytes, 8B shape
#     multi_gpu   benchmarks/multi_gpu.py $MULTI_GPU_ARGS: FSDP2 on 2 GPUs vs 1, 8B shape
#     profile     benchmarks/profile_step.py $PROFILE_ARGS: kernel time by category, memory by phase, 8B shape
#     gate        benchmarks/gpu_gate.py $GATE_ARGS: every user-facing path, PASS/FAIL (run it after every change to src/)
#     peers       benchmarks/peers.py $PEERS_ARGS: HF / Liger / Unsloth / torchtune / ours side by side
#     budget      benchmarks/memory_budget.py $BUDGET_ARGS: --max-memory at each peer's peak, predicted vs measured
#     seventy_b   benchmarks/seventy_b.py $SEVENTY_B_ARGS: 70B on 2 GPUs capped at 24 GB, against the 8B shape
# Expects bitsandbytes, datasets, dill, multiprocess and trl unpacked under .device/site (see README, "GPU runs").
set -u
export PYTHONPATH="$PWD/src:$PWD/.device/site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export QLORA_RESULTS="$OUT/results.jsonl"
PARTS="${PARTS:-tests dequant}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
case " $PARTS " in *" tests "*)
    python3 -m pytest -q tests/nf4 tests/test_gpu_training.py -p no:cacheprovider -rf "$@" 2>&1 | tail -40 | tee "$OUT/tests.log";;
esac
case " $PARTS " in *" parallel "*)
    python3 -m pytest -q tests/parallel -p no:cacheprovider -rf --durations=5 2>&1 | grep -v "it/s\]" | tail -40 | tee "$OUT/parallel.log";;
esac
case " $PARTS " in *" dequant "*)
    python3 benchmarks/dequant.py ${DEQUANT_ARGS:---sweep} 2>&1 | tee "$OUT/dequant.log";;
esac
case " $PARTS " in *" train "*)
    /usr/bin/time -v python3 -m qlora_fsdp train --precision bf16 --output-dir "$OUT/run" 2>&1 \
        | grep -v "it/s\]" | tail -25 | tee "$OUT/train.log";;
esac
# part NAME SCRIPT ARGS TAIL: benchmarks/SCRIPT with ARGS when PARTS names NAME, its log (less progress bars and
# warnings) in $OUT/NAME.log, its last TAIL lines shown
part() {
    case " $PARTS " in *" $1 "*)
        python3 "benchmarks/$2" $3 2>&1 | grep --line-buffered -v "it/s\]\|Warning\|warn(\|USDT" > "$OUT/$1.log"
        tail -"$4" "$OUT/$1.log";;
    esac
}
part train_step train_step.py "${TRAIN_STEP_ARGS:-}" 40
part multi_gpu multi_gpu.py "${MULTI_GPU_ARGS:-}" 40
part profile profile_step.py "${PROFILE_ARGS:-}" 80
part peers peers.py "${PEERS_ARGS:-}" 40
part budget memory_budget.py "${BUDGET_ARGS:-}" 30
part seventy_b seventy_b.py "${SEVENTY_B_ARGS:-}" 40
case " $PARTS " in *" gate "*)
    python3 benchmarks/gpu_gate.py ${GATE_ARGS:-} > "$OUT/gate.log" 2>&1; grep -E "^(PASS|FAIL|NOT RUN|gate:)|x [0-9], torch" "$OUT/gate.log";;
esac
