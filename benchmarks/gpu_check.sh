#!/usr/bin/env bash
# The one prepared GPU check, for sessions lent a GPU (one card, a few minutes in all).
#   bash benchmarks/gpu_check.sh            # results also written to $OUT/gpu_check.jsonl when OUT is set
# It runs bitlab from this source tree (PYTHONPATH), with the GPU image's own torch, timm and OpenCV:
# nothing can be installed there (no network), and bitlab's benchmarks need nothing else. Each
# comparison runs against its baseline in the same process, on the same card.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-/tmp}/gpu_check.jsonl"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import bitlab, cv2, timm, torch; print('torch', torch.__version__, 'timm', timm.__version__, 'opencv', cv2.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "${OUT:-/tmp}/gpu_name.txt"
# A failing section is reported and the next one still runs: a lent GPU's minutes are few.
FAILED=0
run() { echo "+ $*" >&2; "$@" | tee -a "$RESULTS" || { echo "FAILED: $*" >&2; FAILED=1; }; }
log() { local f="$1"; shift; echo "+ $*" >&2; "$@" | tee "${OUT:-/tmp}/$f" || { echo "FAILED: $*" >&2; FAILED=1; }; }

# 1. Models (issue 2): bitlab R50x1 vs timm resnetv2_50x1_bit, bf16 autocast + channels_last.
run $PY benchmarks/models.py --device cuda --amp bf16 --size 128 --batch 128 --rounds 5 --iters 10
run $PY benchmarks/models.py --device cuda --amp bf16 --size 480 --batch 32 --rounds 5 --iters 5
#    Inference (issue 17), as on the CPU: bitlab fused (and its kernel-cached model) vs timm at 128 and
#    224 px, batch 8, float32 as `bitlab evaluate` runs, both memory formats.
run $PY benchmarks/models.py --device cuda --modes inference --size 128 --batch 8 --rounds 5 --iters 50
run $PY benchmarks/models.py --device cuda --modes inference --size 224 --batch 8 --rounds 5 --iters 50

# 2. Fine-tuning (issue 4): the BiT-HyperRule step at 128 px (batch 256) and 480 px (batch 64,
#    --batch-split 2), R50x1, bf16 autocast + channels_last: model-only vs the `bitlab finetune` loop
#    reading real JPEGs with OpenCV workers (one JSON line each: images/s, data-path cost, peak memory).
run $PY benchmarks/finetune.py --part gpu --model R50x1
#    and a short real run end to end on the GPU (offline digits), which must beat chance (10%).
log finetune_digits.txt $PY -m bitlab finetune --model R14x0.5 --data builtin:digits \
  --out "${OUT:-/tmp}/finetune_digits" --batch-size 128 --schedule 10 60 80 90 100 --base-lr 0.03 \
  --resolution 36 32 --no-flip --no-progress

# 3. Pre-training (issue 6): images/s per GPU of R50x1 at 224 px, batch 128, bf16 autocast + channels-last:
#    the `bitlab pretrain` loop (on bitlab's R50x1 and on timm's resnetv2_50x1_bit) against a minimal
#    timm-style loop (timm's train.py is not in the wheel: its core written with timm.create_model and
#    timm.optim.create_optimizer_v2), interleaved, plus `bitlab pretrain` end to end on real JPEGs.
run $PY benchmarks/pretrain.py --part gpu --rounds 3 --steps 30
#    and a short real pre-training run on the GPU (offline digits, Inception crops at 32 px, validation).
log pretrain_digits.txt $PY -m bitlab pretrain --model R14x0.5 --data builtin:digits \
  --out "${OUT:-/tmp}/pretrain_digits" --batch-size 128 --epochs 2 --warmup-steps 5 --crop 32 --no-flip \
  --log-every 5 --no-progress
exit $FAILED
