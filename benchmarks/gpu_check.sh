#!/usr/bin/env bash
# The one prepared GPU check, for sessions lent a GPU (one card, a few minutes in all).
#   bash benchmarks/gpu_check.sh      # results (logs, JSON) go to $OUT when it is set, else ./gpu_check_out
# It installs bitlab when it does not import, then runs each comparison against its baseline in the
# same process, on the same card. Each section is independent; add yours below.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.jsonl"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
if ! $PY -c "import bitlab" 2>/dev/null; then
  $PY -m pip install --quiet -e . 2>&1 | tail -n 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >>"$OUT/gpu.txt" 2>&1 || status=1
run() { echo "+ $*" >&2; "$@" | tee -a "$RESULTS" || status=1; }

# --- models (issue 2): bitlab R50x1 vs timm resnetv2_50x1_bit, bf16 autocast + channels_last.
run $PY benchmarks/models.py --device cuda --amp bf16 --size 128 --batch 128 --rounds 5 --iters 10
run $PY benchmarks/models.py --device cuda --amp bf16 --size 480 --batch 32 --rounds 5 --iters 5

# --- finetune: BiT-HyperRule steps at 128 px (batch 256) and 480 px (batch 64, --batch-split 2),
# R50x1, bf16 autocast, channels-last; model-only vs the finetune loop reading real JPEGs.
timeout 600 $PY benchmarks/finetune.py --part gpu --model R50x1 --json "$OUT/finetune_gpu.json" \
    2>&1 | tee "$OUT/finetune_gpu.log" || status=1
# --- finetune: a short real run end to end on the GPU (digits, bf16, compile off), must beat chance.
timeout 300 $PY -m bitlab finetune --model R14x0.5 --data builtin:digits --out "$OUT/finetune_digits" \
    --batch-size 128 --schedule 10 60 80 90 100 --base-lr 0.03 --resolution 36 32 --no-flip --no-progress \
    2>&1 | tail -3 | tee "$OUT/finetune_digits.log" || status=1

exit $status
