#!/usr/bin/env bash
# Issue 16 item 4: the GPU checks in one script (about 10 minutes on one GPU; GPU time is scarce).
#   1. bench/suite.py's GPU entries: ResNet-50 at 448 px, the stage-1 step in fp32 vs bf16 + channels_last (goal >= 2x)
#      and vs that + torch.compile; OAAM heatmaps and the attention loop on the GPU;
#   2. bench/stream.py on the GPU: the full stage-1 loop (train-backbone through the streaming input pipeline, 2 and 0
#      workers, and in memory) against the bare step alone (goal: loop >= 0.9 x step: data never stalls the GPU), and
#      the loader's images/s with 0, 1, 2 workers.
# Results go to $OUT (default bench/results/); copy the figures into bench/RESULTS.md.
#   bash bench/gpu.sh            # or: OUT=/some/dir bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-machine.txt"
timeout 420 "$PY" bench/suite.py --only gpu_stage1_precision gpu_extraction --out "$OUT/suite-gpu.json"
timeout 360 "$PY" bench/stream.py --device cuda --backbone resnet50 --input-size 448 --image-size 512 --images 320 \
    --batch-size 32 --epochs 2 --rounds 2 --out "$OUT/stream-gpu.json"
