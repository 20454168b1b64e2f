#!/usr/bin/env bash
# BiT upstream pre-training on several GPU nodes: Slurm starts one torchrun per node, and the
# torchruns meet through the c10d rendezvous on the first node; each starts one process per GPU.
#
#   sbatch bitlab/train/slurm_pretrain.sh          # edit DATA / RUN_DIR / the recipe below first
#
# The global batch (--batch-size) is fixed whatever the node count: each GPU runs micro-batches of
# at most --device-batch images and gradients are accumulated (--batch-split is raised to fit), so
# a job resumed on fewer nodes continues the same run. Resuming is automatic: a restarted or
# requeued job finds RUN_DIR/checkpoint.pt and continues from it.
#SBATCH --job-name=bit-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1        # one torchrun launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64         # OpenCV decoding workers (--workers is per GPU process)
#SBATCH --time=48:00:00
#SBATCH --requeue                  # preempted or failed nodes: the job is requeued and resumes
#SBATCH --signal=TERM@300          # 5 min before the time limit: stop at a step boundary, checkpoint
# On SIGTERM every worker finishes its step, rank 0 writes checkpoint.pt, and all of them exit 0:
# torchrun must not take a signal stop for a failure and restart the job (--max-restarts) into the
# time limit. A torchrun signalled itself forwards the signal and kills workers still running after
# its --shutdown-timeout (30 s): keep a step plus a checkpoint well within it. Resubmit (or
# requeue) the job to continue from the checkpoint; a crash (non-zero exit) is still restarted.
#SBATCH --output=%x-%j.out
set -euo pipefail

DATA=${DATA:-/data/imagenet21k-shards}      # `bitlab shards` output: train/ and val/ shard sets
RUN_DIR=${RUN_DIR:-$HOME/runs/bit-m-r50x1}
PORT=${PORT:-29500}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=${SLURM_GPUS_ON_NODE:-8}
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-64} / GPUS ))

# torchrun options: --rdzv-id ties the nodes of this job together; --max-restarts restarts all
# workers from the last checkpoint when one of them dies (a node that drops out needs a requeue).
srun --kill-on-bad-exit=0 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts 3 \
    -m bitlab pretrain \
        --model R50x1 --preset bit-m \
        --data "$DATA" --out "$RUN_DIR" \
        --batch-size 4096 --device-batch 128 \
        --workers "$WORKERS" \
        --checkpoint-every 1000 --eval-every 5000 --log-every 100 --no-progress
